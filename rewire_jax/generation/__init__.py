"""Generation: prefill, the KV-cache decode loop, sampling, and the rewired generation cycle.

  sampling.py  Sampling options and `sample` (explicit PRNG key)
  decode.py    `prefill` and `decode` (a lax.while_loop over a fixed-size KV cache)
  generate.py  `generate`: phase -> prefill -> decode `interval` tokens -> phase -> ...
"""
from .decode import DecodeState, cache_rows, decode, prefill
from .generate import GenerationResult, PhaseRecord, generate
from .sampling import Sampling, sample

__all__ = ["DecodeState", "GenerationResult", "PhaseRecord", "Sampling", "cache_rows", "decode", "generate",
           "prefill", "sample"]
