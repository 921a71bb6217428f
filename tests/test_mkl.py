"""MKL on its own fast kernels on AMD CPUs (factory/mkl.py): loaded by the modules that run torch's
heavy math and by the CLI commands that do, never by `import factory`."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory import cli, mkl

linux_x86 = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                               reason="PyTorch's MKL builds are the x86-64 Linux wheels")

PROBE = """
import json, os, ctypes
import factory.models, torch
from factory import mkl
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
torch.manual_seed(0)
a, b = torch.randn(300, 576), torch.randn(4000, 576)
out = torch.nn.functional.linear(a, b)
print(json.dumps({"loaded": mkl.load_on_amd(), "branch": lib.mkl_serv_cpu_detect(),
                  "out": out[::37, ::53].flatten().tolist()}))
"""

# the loader's whole path on any x86-64 CPU: on an Intel one the library only tells MKL what it knows
AS_IF_AMD = """
import json, os, sys
from factory import mkl
mkl._amd = lambda: True
import factory
lib = os.path.join(os.environ["FACTORY_CACHE_DIR"], "lib", "libmkl_intel_cpu_true.so")
after_package = os.path.exists(lib), "torch" in sys.modules
import factory.{module}
print(json.dumps({{"after_package": after_package, "after_module": os.path.exists(lib),
                  "loaded": mkl.load_on_amd()}}))
"""


def _run(code: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(tmp_path: Path, on: bool) -> dict:
    return _run(PROBE, {"FACTORY_CACHE_DIR": str(tmp_path), "FACTORY_MKL_ON_AMD": "1" if on else "0"})


@linux_x86
def test_mkl_takes_its_avx2_kernels_on_amd_and_computes_the_same_matmul(tmp_path):
    on, off = _probe(tmp_path, True), _probe(tmp_path, False)
    applies = "AuthenticAMD" in Path("/proc/cpuinfo").read_text() and bool(shutil.which("cc") or shutil.which("gcc"))
    assert on["loaded"] is applies and off["loaded"] is False
    if applies:  # MKL's code branch: 0 is its generic one, 5 its AVX2 one (this CPU class has AVX2)
        assert off["branch"] == 0 and on["branch"] >= 5
        assert (tmp_path / "lib" / "libmkl_intel_cpu_true.so").exists()
    else:
        assert on["branch"] == off["branch"]
    assert on["out"] == pytest.approx(off["out"], rel=1e-4, abs=1e-4)


@linux_x86
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="the fix is compiled with cc")
@pytest.mark.parametrize("module", ["models", "train"])
def test_the_torch_modules_load_it_and_importing_the_package_does_not(tmp_path, module):
    result = _run(AS_IF_AMD.format(module=module), {"FACTORY_CACHE_DIR": str(tmp_path)})
    assert result == {"after_package": [False, False], "after_module": True, "loaded": True}


@linux_x86
def test_importing_torch_first_leaves_mkl_alone(tmp_path):
    code = "import torch, factory.models; from factory import mkl; mkl._amd = lambda: True; print(mkl.load_on_amd())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FACTORY_CACHE_DIR": str(tmp_path)},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert not (tmp_path / "lib").exists()


def test_importing_the_package_stays_cheap():
    code = "import sys, factory; print(sorted(m for m in ('factory.mkl', 'torch', 'ctypes') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command, loads", [(["train", "some-task"], True), (["eval", "some-task"], True),
                                            (["mine"], True), (["ingest"], False), (["routes", "--help"], False)])
def test_the_cli_loads_it_for_the_commands_that_run_torch(command, loads, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mkl, "load_on_amd", lambda: calls.append(command) or False)
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("FACTORY_REGISTRY_DIR", str(tmp_path / "registry"))
    CliRunner().invoke(cli.app, command)  # each fails for want of data; the hook has run by then
    assert bool(calls) is loads  # mine imports neither factory.train nor factory.models: the hook alone
