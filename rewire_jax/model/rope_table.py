"""RoPE's `theta ** (2i / dim)` as torch computes it, optionally kept on disk between processes.

The rotary frequencies are bit-identical to transformers' only when torch computes them (numpy's
fp32 pow differs by 1-2 ulp in a few entries: `layers._pos_freqs`). Importing torch for that costs
about a second, and a rerun of the CLI pays it again although its compiled programs come from
JAX's persistent cache: JAX still traces every jitted function (the cache key is the lowered
program), and the trace needs the table. `keep(directory)` (the CLI does it for its compile cache)
makes `pos_freqs` write each table it computes there, keyed by theta, dim and torch's version, and
read it back in later processes instead of importing torch. The directory must be specific to one
CPU model: torch's vectorised pow depends on the instruction set.
"""
from __future__ import annotations

import importlib.metadata
import os
import threading
from pathlib import Path
from typing import Optional

import numpy as np

_dir: Optional[Path] = None   # set only by `keep`


def keep(directory: Optional[str | Path]) -> None:
    """Keep torch's tables under `directory` (created when first written); None: keep nothing."""
    global _dir
    _dir = None if directory is None else Path(directory)


def _path(theta: float, dim: int) -> Optional[Path]:
    if _dir is None:
        return None
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return _dir / f"pos-freqs-{float(theta)!r}-{int(dim)}-torch-{version.replace(os.sep, '_')}.npy"


def _read(path: Path, n: int) -> Optional[np.ndarray]:
    try:
        with open(path, "rb") as f:
            table = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return table if table.dtype == np.float32 and table.shape == (n,) else None


def _write(path: Path, table: np.ndarray) -> None:
    """Atomically (a temporary file renamed); best effort: a read-only cache just keeps nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def pos_freqs(theta: float, dim: int) -> Optional[np.ndarray]:
    """torch's fp32 `theta ** (arange(0, dim, 2) / dim)` [ceil(dim/2)] (read from the kept tables
    when there), or None when torch is not installed."""
    path = _path(theta, dim)   # callers serialise (layers.rope_inv_freq's lock); writes are atomic anyway
    if path is not None and (table := _read(path, (dim + 1) // 2)) is not None:
        return table
    try:
        import torch
    except ImportError:
        return None
    table = (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)).numpy()
    if path is not None:
        _write(path, table)
    return table
