"""Checkpoint conversion: `python -m convert HF_DIR OUT_DIR [--dtype ...]` (HF -> rewire-jax orbax)
and `python -m convert --to-hf SRC OUT` (HF or converted -> HF directory, every architecture)."""
from .convert import convert, to_hf

__all__ = ["convert", "to_hf"]
