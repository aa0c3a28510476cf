"""HF checkpoints -> the rewire-jax param tree, read from the weight declarations (`model/weights.py`).

`lazy_params(cfg, src)` builds the whole tree as `Lazy` tensors (nothing read yet), checks it
(every key of the checkpoint used, every shape as the config implies; errors name the key and both
shapes), and `materialise` reads it one leaf at a time. The same check therefore also validates a
synthetic index of key names and shapes with no data (`TensorSource.from_shapes`).
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..model.config import ModelConfig
from ..model.weights import HF, Weight, declarations, layer_plan, layer_weights, map_weights, model_weights
from . import mxfp4
from .safetensors import CheckpointError, Lazy, TensorSource, concat, normalise, stack, take_slice, transpose

#: Key spellings accepted besides the declared (hub) one: Mixtral's `block_sparse_moe` hub keys are
#: `mlp` in a raw transformers state_dict.
KEY_ALIASES = (("block_sparse_moe.", "mlp."),)


def _candidates(key: str) -> list[str]:
    return [key] + [key.replace(a, b) for a, b in KEY_ALIASES if a in key]


def _take(src: TensorSource, key: str) -> Lazy:
    for k in _candidates(key):
        if src.has(k):
            return src.take(k)
    return src.take(key)   # raises: missing key


def _swiglu_experts(src: TensorSource, prefix: str, part: str, which: str, num_experts: int) -> Lazy:
    """which: gate|up|down. Per-expert hub layout, or the fused in-memory layout
    (`gate_up_proj` [E, 2I, d], gate rows first; `down_proj` [E, d, I])."""
    for p in _candidates(prefix):
        if src.has(f"{p}.gate_up_proj") or src.has(f"{p}.down_proj"):
            if which == "down":
                return transpose(src.take(f"{p}.down_proj"), (0, 2, 1))
            fused = src.take(f"{p}.gate_up_proj")
            inter = fused.shape[1] // 2
            lo = 0 if which == "gate" else inter
            return transpose(take_slice(fused, 1, lo, lo + inter), (0, 2, 1))
        if src.has(f"{p}.0.{part}.weight"):
            prefix = p
            break
    return stack([transpose(src.take(f"{prefix}.{e}.{part}.weight")) for e in range(num_experts)])


def _dequantized(src: TensorSource, prefix: str) -> Lazy:
    """`{prefix}_blocks` + `{prefix}_scales` -> float32 [E, out, in] (lazy, exact)."""
    blocks, scales = src.take(f"{prefix}_blocks"), src.take(f"{prefix}_scales")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise CheckpointError(f"MXFP4 {blocks.origin} {blocks.shape} and {scales.origin} {scales.shape} "
                              "do not pair up ([E, out, G, 16] and [E, out, G])")
    shape = blocks.shape[:-2] + (blocks.shape[-2] * 32,)

    def part(index):   # dequantize just the blocks of this region (one shard)
        lead, last = index[:-1], index[-1]
        g0, g1 = last.start // 32, -(-last.stop // 32)
        out = mxfp4.dequantize(blocks.part(lead + (slice(g0, g1), slice(0, 16))), scales.part(lead + (slice(g0, g1),)))
        return out[..., last.start - g0 * 32:last.stop - g0 * 32]
    return Lazy(shape, "float32", lambda: mxfp4.dequantize(blocks.load(), scales.load()), blocks.origin, part)


def _gptoss_experts(src: TensorSource, prefix: str, part: str) -> Lazy:
    """gpt-oss: gate / up interleaved in the columns of gate_up_proj [E, d, 2I] (and its bias);
    MXFP4 `_blocks` / `_scales` ([E, out, in/32, 16], dequantized exactly) or unquantized."""
    if part.endswith("bias"):
        if part == "down_bias":
            return src.take(f"{prefix}.down_proj_bias")
        gu = src.take(f"{prefix}.gate_up_proj_bias")
        return take_slice(gu, 1, 0 if part == "gate_bias" else 1, gu.shape[-1], 2)
    name = "down_proj" if part == "down" else "gate_up_proj"
    if src.has(f"{prefix}.{name}_blocks"):
        full = transpose(_dequantized(src, f"{prefix}.{name}"), (0, 2, 1))   # [E, out, in] -> [E, in, out]
    else:
        full = src.take(f"{prefix}.{name}")
    if part == "down":
        return full
    return take_slice(full, 2, 0 if part == "gate" else 1, full.shape[-1], 2)


def _joined(src: TensorSource, w: Weight, cfg: ModelConfig, prefix: str) -> Lazy:
    """A fused weight: its parts read (and shape-checked, the error naming the part's key) and joined."""
    parts = []
    for pw in w.parts():
        lazy = read(src, pw, cfg, prefix)
        if tuple(lazy.shape) != tuple(pw.shape):
            raise CheckpointError(f"shape mismatch for {lazy.origin}: checkpoint has {lazy.shape}, "
                                  f"config.json implies {tuple(pw.shape)} (a part of a fused weight)")
        parts.append(lazy)
    return concat(parts, -1)


def read(src: TensorSource, w: Weight, cfg: ModelConfig, prefix: str = "") -> Lazy:
    """One declared weight (unstacked) from the checkpoint; `prefix` = 'model.layers.{i}.' for layers."""
    h: HF = w.hf
    key = prefix + h.key
    if h.kind == "id":
        return _take(src, key)
    if h.kind == "t":
        return transpose(_take(src, key))
    if h.kind == "experts":
        which = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up",
                 "w2": "down"}[h.part]
        return _swiglu_experts(src, key, h.part, which, cfg.num_experts)
    if h.kind == "gptoss":
        return _gptoss_experts(src, key, h.part)
    if h.kind == "cat":
        return _joined(src, w, cfg, prefix)
    raise ValueError(f"unknown HF mapping kind {h.kind!r}")


def lazy_params(cfg: ModelConfig, src: TensorSource) -> dict:
    """The param tree as Lazy leaves, checked against the declarations (keys and shapes)."""
    def checked(w: Weight, lazy: Lazy, param: str) -> Lazy:
        if tuple(lazy.shape) != tuple(w.shape):
            raise CheckpointError(f"shape mismatch for {lazy.origin} (param {param}): checkpoint has "
                                  f"{lazy.shape}, config.json implies {tuple(w.shape)}")
        return lazy

    def read_layer(i: int) -> dict:
        return jax.tree_util.tree_map_with_path(
            lambda path, w: checked(w, read(src, w, cfg, f"model.layers.{i}."), f"layer {i} {jax.tree_util.keystr(path)}"),
            layer_weights(cfg, i), is_leaf=lambda x: isinstance(x, Weight))

    tree = {name: checked(w, read(src, w, cfg), name) for name, w in model_weights(cfg).items()}
    tree["stacks"] = {
        str(s): {str(j): jax.tree.map(lambda *ls: stack(list(ls)), *[read_layer(st.layer(r, j)) for r in range(st.repeats)],
                                      is_leaf=lambda x: isinstance(x, Lazy))
                 for j in range(st.unit)}
        for s, st in enumerate(layer_plan(cfg))}
    if cfg.model_type == "deepseek_v3":
        # V3 checkpoints carry multi-token-prediction layers after the last decoder layer; HF drops them
        extra = re.compile(r"model\.layers\.(\d+)\.")
        src.skip(lambda k: bool((m := extra.match(k))) and int(m.group(1)) >= cfg.num_layers)
    unused = src.unused()
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise CheckpointError(f"unexpected keys in {src.where} for {cfg.model_type}: {shown}")
    expected = {jax.tree_util.keystr(k): w for k, w in
                jax.tree_util.tree_flatten_with_path(declarations(cfg), is_leaf=lambda x: isinstance(x, Weight))[0]}
    got = {jax.tree_util.keystr(k): v for k, v in
           jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Lazy))[0]}
    assert set(expected) == set(got), (sorted(set(expected) ^ set(got)))
    for path, w in expected.items():
        if tuple(got[path].shape) != tuple(w.shape):
            raise CheckpointError(
                f"shape mismatch for {got[path].origin} (param {path}): checkpoint has {got[path].shape}, "
                f"config.json implies {tuple(w.shape)}")
    return tree


def materialise(tree, cfg: ModelConfig, progress: bool = False, desc: str = "loading", shardings=None) -> dict:
    """Read every Lazy leaf as a numpy array of its declared dtype, or, with `shardings` (a param
    tree of jax Shardings), straight into the shards of the devices this process owns (`place`)."""
    dtypes = jax.tree.leaves(map_weights(lambda w: np.dtype(w.dtype(cfg)), declarations(cfg)))
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, Lazy))
    it: Iterable = leaves
    if progress:
        from tqdm import tqdm
        it = tqdm(leaves, desc=desc, unit="tensor")
    if shardings is None:
        out = [np.asarray(leaf.load()).astype(dt, copy=False) for leaf, dt in zip(it, dtypes)]
    else:
        out = [produce() for produce in jax.tree.leaves(leaf_producers(tree, cfg, shardings), is_leaf=callable)]
    return jax.tree_util.tree_unflatten(treedef, out)


def leaf_producers(tree, cfg: ModelConfig, shardings) -> dict:
    """The param tree with each Lazy leaf replaced by a zero-argument function that places it
    (`place`, declared dtype) when called: for writers that stream one tensor at a time."""
    dtypes = jax.tree.leaves(map_weights(lambda w: np.dtype(w.dtype(cfg)), declarations(cfg)))
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, Lazy))
    sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return jax.tree_util.tree_unflatten(treedef, [functools.partial(place, leaf, s, dt)
                                                  for leaf, s, dt in zip(leaves, sh, dtypes)])


#: Host bytes read and copied to a device at a time when a shard is larger (`place`).
CHUNK_BYTES = 64 << 20


@functools.lru_cache(maxsize=None)
def _updater(ndim: int):
    return jax.jit(lambda buf, chunk, *offs: jax.lax.dynamic_update_slice(buf, chunk, offs), donate_argnums=0)


def _chunks(index: tuple, itemsize: int) -> list[tuple]:
    """Split a region (tuple of slices) along its leading dims into pieces of <= CHUNK_BYTES."""
    sizes = [s.stop - s.start for s in index]
    if int(np.prod(sizes)) * itemsize <= CHUNK_BYTES:
        return [index]
    for ax, n in enumerate(sizes):
        if n > 1:
            step = max(1, n // -(-int(np.prod(sizes)) * itemsize // CHUNK_BYTES))
            out = []
            for lo in range(index[ax].start, index[ax].stop, step):
                sub = index[:ax] + (slice(lo, min(lo + step, index[ax].stop)),) + index[ax + 1:]
                out.extend(_chunks(sub, itemsize))
            return out
    return [index]


def _grid_pieces(index: tuple, grid: tuple) -> list[tuple]:
    """The cells of a chunk grid (storage chunks of shape `grid`) intersected with a region."""
    import itertools
    axes = [[slice(max(lo, s.start), min(lo + g, s.stop)) for lo in range(s.start - s.start % g, s.stop, g)]
            for s, g in zip(index, grid)]
    return [tuple(cell) for cell in itertools.product(*axes)]


def place(lazy: Lazy, sharding, dtype) -> jax.Array:
    """A Lazy tensor -> a jax.Array laid out by `sharding`, reading from the checkpoint only the
    regions of the shards this process's devices hold (each distinct region once; replicated
    copies share it). A shard bigger than CHUNK_BYTES (or than the storage's chunks, `lazy.grid`)
    is filled in place piece by piece (a donated dynamic_update_slice), so the host never holds more
    than one piece: a host's peak is its own shards plus a piece, never a full tensor."""
    dtype = np.dtype(dtype)
    shape = tuple(lazy.shape)
    by_region: dict = {}
    for dev, idx in sharding.addressable_devices_indices_map(shape).items():
        region = normalise(idx, shape)
        by_region.setdefault(tuple((s.start, s.stop) for s in region), []).append(dev)
    arrays = []
    for key, devs in by_region.items():
        region = tuple(slice(a, b) for a, b in key)
        pieces = _grid_pieces(region, lazy.grid) if lazy.grid else _chunks(region, dtype.itemsize)
        if len(pieces) == 1:
            host = np.asarray(lazy.part(region)).astype(dtype, copy=False)
            arrays.extend(jax.device_put(host, d) for d in devs)
            del host
            continue
        local = tuple(b - a for a, b in key)
        bufs = [jnp.zeros(local, dtype, device=d) for d in devs]
        for piece in pieces:
            host = np.asarray(lazy.part(piece)).astype(dtype, copy=False)
            offs = [np.int32(p.start - r.start) for p, r in zip(piece, region)]
            for i, d in enumerate(devs):
                bufs[i] = _updater(len(shape))(bufs[i], jax.device_put(host, d), *offs)
                bufs[i].block_until_ready()
            del host
        arrays.extend(bufs)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def read_params(path, cfg: ModelConfig, progress: bool = False, src: Optional[TensorSource] = None,
                shardings=None) -> dict:
    """An HF directory's weights as the param tree: numpy leaves, or with `shardings` jax.Arrays
    read straight into this process's shards."""
    src = src or TensorSource.from_dir(path)
    return materialise(lazy_params(cfg, src), cfg, progress, shardings=shardings)
