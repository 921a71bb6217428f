"""MKL's own fast kernels on AMD CPUs, loaded before torch where torch does the heavy math.

PyTorch's x86 wheels run fp32 matmuls in Intel MKL, which picks its kernels by CPU
vendor and gives AMD CPUs slower generic ones. PyTorch's release engineers name the
fix (pytorch/builder#1245): a library whose `mkl_serv_intel_cpu_true` returns 1,
loaded ahead of MKL. `load_on_amd` compiles that one-line library once into the
factory's cache with the system C compiler and loads it into the process's global
symbol scope, so libtorch binds to it when torch is imported next. Measured on the
2-core AMD EPYC this project is developed on: the LM head's matmul 65 -> 113 GFLOPS,
training 222 -> 249 tokens/s (five alternating runs of the bench's factory side).

Trade-off: MKL then runs the kernels it runs on Intel CPUs, chosen by the CPU's
instruction sets as there, so results differ from the generic ones by float rounding
(a test). Nothing happens off Linux x86-64 AMD, once torch is imported (the binding
is made at that point: importing torch first opts out), without a C compiler, or with
FACTORY_MKL_ON_AMD=0. Never raises: a failed compile only leaves MKL as it is.

Where: `import factory` does not load it (it costs a compiler run on first use and changes
float rounding for every torch user of the process). The modules that run torch's heavy
math call `load_on_amd()` above their own torch import: `factory.train` and
`factory.models`, and the CLI for the commands that train, evaluate, embed or serve
(`factory.cli.TORCH_COMMANDS`), since some of those import torch through other modules
first (`factory.evaluate.generate`, spaCy in curate). The first call decides for the
process; later calls return its answer.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from factory.base_model import cache_dir

SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
ENV = "FACTORY_MKL_ON_AMD"
_loaded: bool | None = None  # the first call's answer: the binding, once made, lasts the process


def _amd() -> bool:
    """An AMD x86-64 CPU under Linux (the only system with a /proc/cpuinfo naming AuthenticAMD)."""
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _library() -> Path | None:
    """The compiled library in the cache (built atomically on first use); None without a compiler."""
    target = cache_dir() / "lib" / "libmkl_intel_cpu_true.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "shim.c"
        source.write_text(SOURCE)
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                              capture_output=True)
        if done.returncode:
            return None
        os.replace(built, target)
    return target


def load_on_amd() -> bool:
    """Make MKL use its own fast kernels on this AMD CPU; True when the library is loaded.

    Call it before the process imports torch: once torch is imported the call does nothing
    and returns False. Only the first call acts; every later one returns its answer.
    """
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if os.environ.get(ENV, "1") == "0" or "torch" in sys.modules or not _amd():
        return False
    try:
        library = _library()
        if library is None:
            return False
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
    except OSError:
        return False
    return True
