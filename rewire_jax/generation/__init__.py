"""Generation: prefill, the KV-cache decode loop, sampling, and the rewired generation cycle.

  sampling.py  Sampling options and `sample` (explicit PRNG key)
  decode.py    `prefill`, `decode` (one device call: a few tokens over a fixed-size KV cache) and
               `run_decode` (a call cut into such chunks, `DecodeChunks`; the host looks between them)
  generate.py  `generate`: phase -> prefill -> decode `interval` tokens -> phase -> ...
  grouping.py  rows grouped by context bucket for the optimisation phase (used by both)
  queue.py     `generate_queue`: any number of prompts through a batch kept full (refilled rows)
"""
from .decode import DecodeChunks, DecodeState, cache_rows, decode, default_chunks, prefill, run_decode
from .generate import GenerationResult, PhaseRecord, generate
from .queue import QueueResult, generate_queue
from .sampling import Sampling, sample

__all__ = ["DecodeChunks", "DecodeState", "GenerationResult", "PhaseRecord", "QueueResult", "Sampling", "cache_rows",
           "decode", "default_chunks", "generate", "generate_queue", "prefill", "run_decode", "sample"]
