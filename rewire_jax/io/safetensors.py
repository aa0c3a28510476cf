"""Lazy reading of safetensors checkpoints: `TensorSource` (the named tensors of a directory, or a
synthetic index of names and shapes) and `Lazy` tensors (shape known, data read on `.load()`), so
that a checkpoint is checked against the model before any data is read (`rewire_jax.io.hf`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np



class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing/unexpected keys, wrong shapes, bad files."""


class Lazy:
    """A tensor whose data is read only on `.load()`; ops compose a loader function."""

    def __init__(self, shape, dtype, loader: Callable[[], np.ndarray], origin: str = ""):
        self.shape, self.dtype, self._loader, self.origin = tuple(shape), np.dtype(dtype), loader, origin

    def load(self) -> np.ndarray:
        out = self._loader()
        assert out.shape == self.shape, (self.origin, out.shape, self.shape)
        return out

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape) -> "Lazy":
        return Lazy(shape, self.dtype, lambda: fn(self.load()), self.origin)

    def __repr__(self):
        return f"Lazy({self.origin}, {self.shape}, {self.dtype})"


def transpose(t: Lazy, axes: Optional[tuple[int, ...]] = None) -> Lazy:
    axes = tuple(reversed(range(len(t.shape)))) if axes is None else axes
    return t.map(lambda a: np.transpose(a, axes), tuple(t.shape[i] for i in axes))


def stack(ts: list[Lazy], axis: int = 0) -> Lazy:
    shapes = {t.shape for t in ts}
    if len(shapes) != 1:
        raise CheckpointError(f"cannot stack tensors of different shapes: "
                              + ", ".join(f"{t.origin} {t.shape}" for t in ts))
    shape = list(ts[0].shape)
    shape.insert(axis, len(ts))
    return Lazy(shape, ts[0].dtype, lambda: np.stack([t.load() for t in ts], axis), ts[0].origin)


def take_slice(t: Lazy, axis: int, start: int, stop: int, step: int = 1) -> Lazy:
    idx = [slice(None)] * len(t.shape)
    idx[axis] = slice(start, stop, step)
    shape = list(t.shape)
    shape[axis] = len(range(start, stop, step))
    return t.map(lambda a: a[tuple(idx)], shape)


class TensorSource:
    """Named tensors of a checkpoint; records which keys were consumed.

    `index` maps key -> (shape, dtype, loader); `from_dir` builds it from safetensors files.
    """

    def __init__(self, index: dict[str, tuple[tuple, str, Callable[[], np.ndarray]]], where: str = ""):
        self.index, self.where, self.used = index, where, set()

    @classmethod
    def from_dir(cls, path: str | Path) -> "TensorSource":
        from safetensors import safe_open

        path = Path(path)
        idx_file = path / "model.safetensors.index.json"
        if idx_file.exists():
            weight_map = json.loads(idx_file.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{path} has neither model.safetensors nor model.safetensors.index.json; "
                "pass an HF model directory saved with save_pretrained (safetensors) or a "
                "directory written by `python -m convert`")
        index = {}
        for fname in files:
            fpath = path / fname
            if not fpath.exists():
                raise CheckpointError(f"shard {fpath} listed in the index is missing")
            try:
                with safe_open(str(fpath), framework="numpy") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        index[key] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()),
                                      _reader(str(fpath), key))
            except Exception as e:   # safetensors raises its own SafetensorError for corrupt headers
                raise unreadable(fpath, e) from None
        return cls(index, str(path))

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[tuple, str]]) -> "TensorSource":
        """A source with key names and shapes only (reading data raises)."""
        def no_data():
            raise CheckpointError("synthetic index: no tensor data")
        return cls({k: (tuple(s), d, no_data) for k, (s, d) in shapes.items()}, "<synthetic index>")

    def has(self, key: str) -> bool:
        return key in self.index

    def take(self, key: str) -> Lazy:
        if key not in self.index:
            raise CheckpointError(f"missing key {key!r} in {self.where}")
        self.used.add(key)
        shape, dtype, loader = self.index[key]
        return Lazy(shape, dtype, loader, key)

    def skip(self, predicate: Callable[[str], bool]) -> None:
        """Mark keys the model deliberately does not use (e.g. DeepSeek-V3's MTP layers) as consumed."""
        self.used.update(k for k in self.index if predicate(k))

    def unused(self) -> list[str]:
        return sorted(set(self.index) - self.used)


def _st_dtype(name: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
            "U8": "uint8", "I8": "int8", "I32": "int32", "I64": "int64", "BOOL": "bool"}.get(name, name.lower())


def unreadable(fpath, error: Exception) -> "CheckpointError":
    return CheckpointError(f"cannot read {fpath}: {type(error).__name__}: {error}. The file is truncated or "
                           "corrupt (an interrupted download or copy?); fetch or convert it again")


def _reader(fpath: str, key: str):
    def load():
        from safetensors import safe_open
        try:
            with safe_open(fpath, framework="numpy") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise unreadable(fpath, e) from None
    return load
