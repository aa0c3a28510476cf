"""Conversions between checkpoint formats (the logic behind `python -m convert`).

  to_converted  HF directory -> our orbax format: checked against config.json (every key used,
                every shape right) before any tensor is read, then read one tensor at a time
                (progress bar) and written atomically
  to_hf         HF or converted directory -> HF directory (config.json, safetensors in the hub's
                key layout, tokenizer), for every architecture
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from . import checkpoint, families, hf
from .export import TOKENIZER_FILES, save_hf
from .safetensors import TensorSource


def to_converted(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
                 progress: bool = True, mesh=None) -> Path:
    """mesh (None, a Mesh or 'fsdp=8'-style spec): read straight into the shards of this process's
    devices and write them shard by shard (multi-host: every host runs the same command). One
    tensor is read, written and released at a time: the peak host memory is about the largest
    tensor twice (it and orbax's copy), not the model."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    if checkpoint.is_converted(hf_dir):
        raise ValueError(f"{hf_dir} is already a rewire-jax checkpoint; load it directly")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite")
    cfg = families.from_hf(families.load_hf_config(hf_dir), dtype=str(jnp.dtype(dtype)))
    lazy = hf.lazy_params(cfg, TensorSource.from_dir(hf_dir))
    import jax
    from ..model import sharding
    from ..model.weights import param_shapes
    if mesh is not None:
        shardings = sharding.param_shardings(cfg, sharding.mesh_from_spec(mesh))
    else:   # jax.Arrays on the (CPU) device: orbax writes them without a second host copy
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        shardings = jax.tree.map(lambda _: dev, param_shapes(cfg))
    # streamed: each tensor is read (into this process's shards), written and released before the
    # next, so the peak is one tensor (and orbax's copy of it), not the model
    produce = hf.leaf_producers(lazy, cfg, shardings)
    return checkpoint.save_converted(out_dir, cfg, produce, hf_dir, overwrite=overwrite, progress=progress)


def to_hf(src_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write an HF directory from an HF or converted one (dtype: of the saved tensors; default the
    source's stored dtype for a converted directory, float32 for an HF one)."""
    from ..api import load

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir} is not a directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite")
    if checkpoint.is_converted(src_dir):
        stored = checkpoint.read_config(src_dir).dtype
        model = load(src_dir, dtype=dtype or stored)
    else:
        model = load(src_dir, dtype=dtype or "float32")
    hf_config = families.load_hf_config(src_dir) if (src_dir / "config.json").exists() else None
    tok = src_dir if any((src_dir / f).exists() for f in TOKENIZER_FILES) else None
    return save_hf(model.config, model.params, out_dir, tokenizer=tok, hf_config=hf_config,
                   dtype=np.dtype(jnp.dtype(model.config.dtype)), overwrite=overwrite)
