"""Benchmarks: `make bench` runs every stage's `run()` and writes bench/results/latest.json."""
