"""Benchmarks for trm_jax: a framework-agnostic timing harness and PyTorch references.

* :mod:`benchmarks.harness` — timing, memory, result rows, tables, JSON output,
  synthetic CIFAR-shaped data (never presented as real data).
* :mod:`benchmarks.torch_reference` — the PyTorch implementations of the same
  benchmark specs, used as the comparison baseline.
"""
