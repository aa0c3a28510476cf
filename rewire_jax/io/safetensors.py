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
    """A tensor whose data is read only on `.load()`; ops compose a loader function.

    `.part(index)` (a tuple of one slice per dimension, step 1) reads just that region: from the
    file (safetensors slices), through transposes, stacks, strided slices and MXFP4 blocks, so
    that a shard is read without the full tensor (`rewire_jax.io.hf.place`). Ops without a
    region reader fall back to loading the whole tensor once.
    """

    def __init__(self, shape, dtype, loader: Callable[[], np.ndarray], origin: str = "",
                 part: Optional[Callable[[tuple], np.ndarray]] = None, grid: Optional[tuple] = None):
        self.shape, self.dtype, self._loader, self.origin = tuple(shape), np.dtype(dtype), loader, origin
        self._part = part
        self.grid = grid   # the storage's chunk shape, when reads are cheapest chunk by chunk

    def load(self) -> np.ndarray:
        out = self._loader()
        assert out.shape == self.shape, (self.origin, out.shape, self.shape)
        return out

    def part(self, index: tuple) -> np.ndarray:
        index = normalise(index, self.shape)
        if all(s.start == 0 and s.stop == n for s, n in zip(index, self.shape)):
            return self.load()
        out = self._part(index) if self._part is not None else self.load()[index]
        want = tuple(s.stop - s.start for s in index)
        assert out.shape == want, (self.origin, index, out.shape, want)
        return out

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape) -> "Lazy":
        return Lazy(shape, self.dtype, lambda: fn(self.load()), self.origin)

    def __repr__(self):
        return f"Lazy({self.origin}, {self.shape}, {self.dtype})"


def normalise(index, shape) -> tuple:
    """index (tuple of slices, possibly shorter than shape, None bounds) -> full tuple of
    slice(start, stop) with ints, step 1."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        assert step == 1, "region reads take step-1 slices"
        out.append(slice(start, stop))
    return tuple(out)


def transpose(t: Lazy, axes: Optional[tuple[int, ...]] = None) -> Lazy:
    axes = tuple(reversed(range(len(t.shape)))) if axes is None else axes
    inv = np.argsort(axes)

    def part(index):
        src = tuple(index[int(inv[i])] for i in range(len(axes)))
        return np.transpose(t.part(src), axes)
    return Lazy(tuple(t.shape[i] for i in axes), t.dtype, lambda: np.transpose(t.load(), axes), t.origin, part)


def stack(ts: list[Lazy], axis: int = 0) -> Lazy:
    shapes = {t.shape for t in ts}
    if len(shapes) != 1:
        raise CheckpointError(f"cannot stack tensors of different shapes: "
                              + ", ".join(f"{t.origin} {t.shape}" for t in ts))
    shape = list(ts[0].shape)
    shape.insert(axis, len(ts))

    def part(index):
        rest = index[:axis] + index[axis + 1:]
        sel = range(index[axis].start, index[axis].stop)
        out = None
        for i, r in enumerate(sel):   # one component at a time into the output
            a = ts[r].part(rest)
            if out is None:
                out = np.empty(a.shape[:axis] + (len(sel),) + a.shape[axis:], a.dtype)
            out[(slice(None),) * axis + (i,)] = a
            del a
        return out

    return Lazy(shape, ts[0].dtype, lambda: _stack_all(ts, axis), ts[0].origin, part)


def _stack_all(ts, axis):
    out = None
    for i, t in enumerate(ts):
        a = t.load()
        if out is None:
            out = np.empty(a.shape[:axis] + (len(ts),) + a.shape[axis:], a.dtype)
        out[(slice(None),) * axis + (i,)] = a
        del a
    return out


def concat(ts: list[Lazy], axis: int = -1) -> Lazy:
    """Tensors joined along `axis` (a fused weight: q | k | v, gate | up); a region read reads only
    the parts it overlaps."""
    axis = axis % len(ts[0].shape)
    rest = {t.shape[:axis] + t.shape[axis + 1:] for t in ts}
    if len(rest) != 1:
        raise CheckpointError(f"cannot join tensors along axis {axis}: "
                              + ", ".join(f"{t.origin} {t.shape}" for t in ts))
    edges = np.cumsum([0] + [t.shape[axis] for t in ts]).tolist()
    shape = list(ts[0].shape)
    shape[axis] = edges[-1]

    def part(index):
        s = index[axis]
        pieces = []
        for t, lo, hi in zip(ts, edges[:-1], edges[1:]):
            a, b = max(s.start, lo), min(s.stop, hi)
            if a < b:
                pieces.append(t.part(index[:axis] + (slice(a - lo, b - lo),) + index[axis + 1:]))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis)

    def load():
        return np.concatenate([t.load() for t in ts], axis)
    return Lazy(shape, ts[0].dtype, load, " + ".join(t.origin for t in ts), part)


def take_slice(t: Lazy, axis: int, start: int, stop: int, step: int = 1) -> Lazy:
    idx = [slice(None)] * len(t.shape)
    idx[axis] = slice(start, stop, step)
    shape = list(t.shape)
    shape[axis] = len(range(start, stop, step))

    def part(index):
        s = index[axis]
        if step == 1:
            src = index[:axis] + (slice(start + s.start, start + s.stop),) + index[axis + 1:]
            return t.part(src)
        lo, hi = start + s.start * step, start + (s.stop - 1) * step + 1
        src = index[:axis] + (slice(lo, hi),) + index[axis + 1:]
        sub = [slice(None)] * len(t.shape)
        sub[axis] = slice(None, None, step)
        return np.ascontiguousarray(t.part(src)[tuple(sub)])
    return Lazy(shape, t.dtype, lambda: t.load()[tuple(idx)], t.origin, part)


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
        return Lazy(shape, dtype, loader, key, getattr(loader, "part", None))

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

    def part(index):
        from safetensors import safe_open
        try:
            with safe_open(fpath, framework="numpy") as f:
                return f.get_slice(key)[index]
        except Exception as e:
            raise unreadable(fpath, e) from None
    load.part = part
    return load
