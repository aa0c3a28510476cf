"""Benchmarks and measurement: `python -m rewire_jax.bench` (speed against the PyTorch way),
`python -m rewire_jax.bench.compile_time` (cold compile time against depth).

  run.py              the speed benchmark (docs/performance.md)
  compile_time.py     cold rewired `generate` vs number of layers
  perf.py             compile counting, FLOP counts of a phase, measured matmul peaks
  torch_reference.py  the rewiring cycle in PyTorch on HF models (the tests' oracle, and the
                      benchmark's PyTorch way); imports torch
"""
from .run import main

__all__ = ["main"]
