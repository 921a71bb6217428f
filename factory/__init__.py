"""SLM Factory: agent logs in, specialist small language models out."""

from factory import mkl

__version__ = "0.1.0"
MKL_ON_AMD = mkl.load_on_amd()  # before anything imports torch: see factory/mkl.py
