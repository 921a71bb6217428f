"""`import factory` puts MKL on its own fast kernels on AMD CPUs (factory/mkl.py)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="PyTorch's MKL builds are the x86-64 Linux wheels")

PROBE = """
import json, os, ctypes
import factory, torch
mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
torch.manual_seed(0)
a, b = torch.randn(300, 576), torch.randn(4000, 576)
out = torch.nn.functional.linear(a, b)
print(json.dumps({"loaded": factory.MKL_ON_AMD, "branch": mkl.mkl_serv_cpu_detect(), "out": out[::37, ::53].flatten().tolist()}))
"""


def _probe(tmp_path: Path, on: bool) -> dict:
    env = {**os.environ, "FACTORY_CACHE_DIR": str(tmp_path), "FACTORY_MKL_ON_AMD": "1" if on else "0"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def test_importing_torch_first_leaves_mkl_alone(tmp_path):
    env = {**os.environ, "FACTORY_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import torch, factory; print(factory.MKL_ON_AMD)"],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert not (tmp_path / "lib").exists()
