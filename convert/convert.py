"""`python -m convert`: a thin front end to `rewire_jax.io.convert` (HF -> orbax, and back to HF)."""
from rewire_jax.io.convert import to_converted as convert, to_hf

__all__ = ["convert", "to_hf"]
