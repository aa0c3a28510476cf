"""HF checkpoints -> the rewire-jax param tree, read from the weight declarations (`model/weights.py`).

`lazy_params(cfg, src)` builds the whole tree as `Lazy` tensors (nothing read yet), checks it
(every key of the checkpoint used, every shape as the config implies; errors name the key and both
shapes), and `materialise` reads it one leaf at a time. The same check therefore also validates a
synthetic index of key names and shapes with no data (`TensorSource.from_shapes`).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import jax
import numpy as np

from ..model.config import ModelConfig
from ..model.weights import HF, Weight, declarations, layer_plan, layer_weights, map_weights, model_weights
from . import mxfp4
from .safetensors import CheckpointError, Lazy, TensorSource, stack, take_slice, transpose

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
    return Lazy(shape, "float32", lambda: mxfp4.dequantize(blocks.load(), scales.load()), blocks.origin)


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


def materialise(tree, cfg: ModelConfig, progress: bool = False, desc: str = "loading") -> dict:
    """Read every Lazy leaf as a numpy array of its declared dtype."""
    dtypes = jax.tree.leaves(map_weights(lambda w: np.dtype(w.dtype(cfg)), declarations(cfg)))
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, Lazy))
    it: Iterable = leaves
    if progress:
        from tqdm import tqdm
        it = tqdm(leaves, desc=desc, unit="tensor")
    out = [np.asarray(leaf.load()).astype(dt) for leaf, dt in zip(it, dtypes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def read_params(path, cfg: ModelConfig, progress: bool = False, src: Optional[TensorSource] = None) -> dict:
    """An HF directory's weights as the param tree (numpy leaves)."""
    src = src or TensorSource.from_dir(path)
    return materialise(lazy_params(cfg, src), cfg, progress)
