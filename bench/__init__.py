"""Benchmarks: `make bench` runs every stage's `run()` and writes bench/results/latest.json.

Every bench process (`python -m bench.run`, and each training side `python -m bench.train`)
imports this package first, so MKL's own fast kernels on AMD CPUs are loaded here, before
any stage imports torch (bench/mine.py and bench/evaluate.py import it at their top): the
figures are measured on the matmul library `factory train`, `eval` and `serve` use
(factory/mkl.py). `MKL_ON_AMD` says whether it was loaded.
"""

from factory import mkl

MKL_ON_AMD = mkl.load_on_amd()
