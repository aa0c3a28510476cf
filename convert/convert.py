"""Convert an HF MoE checkpoint directory into rewire-jax's orbax format.

The HF weights are validated against config.json (every key used, every shape right) before any
tensor is read, then read one tensor at a time (progress bar) and written atomically: the output
directory appears only when it is complete, so an interrupted run leaves nothing `load` accepts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rewire_jax import checkpoint, config as config_lib, hf_io


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool = True) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    if checkpoint.is_converted(hf_dir):
        raise ValueError(f"{hf_dir} is already a rewire-jax checkpoint; load it directly")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite")
    cfg = config_lib.from_hf(config_lib.load_hf_config(hf_dir), dtype=dtype)
    lazy = hf_io.lazy_params(cfg, hf_io.TensorSource.from_dir(hf_dir))
    import jax.numpy as jnp
    params = hf_io.materialise(lazy, np.dtype(jnp.dtype(dtype)), progress=progress, desc="converting")
    return checkpoint.save_converted(out_dir, cfg, params, hf_dir, overwrite=overwrite)
