"""HF -> rewire-jax checkpoint conversion: `python -m convert HF_DIR OUT_DIR [--dtype ...]`."""
from .convert import convert

__all__ = ["convert"]
