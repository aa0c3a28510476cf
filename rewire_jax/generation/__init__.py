"""Generation: prefill, the KV-cache decode loop, sampling, and the rewired generation cycle.

  sampling.py  Sampling options and `sample` (explicit PRNG key)
  decode.py    `prefill` and `decode` (a lax.while_loop over a fixed-size KV cache)
  generate.py  `generate`: phase -> prefill -> decode `interval` tokens -> phase -> ...
  grouping.py  rows grouped by context bucket for the optimisation phase (used by both)
  queue.py     `generate_queue`: any number of prompts through a batch kept full (refilled rows)
"""
from .decode import DecodeState, cache_rows, decode, prefill
from .generate import GenerationResult, PhaseRecord, generate
from .queue import QueueResult, generate_queue
from .sampling import Sampling, sample

__all__ = ["DecodeState", "GenerationResult", "PhaseRecord", "Sampling", "cache_rows", "decode", "generate",
           "generate_queue", "prefill", "QueueResult", "sample"]
