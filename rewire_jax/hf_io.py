"""Reading HF safetensors checkpoints into the rewire-jax param tree.

Tensors are read lazily: a family converter builds a tree of `Lazy` tensors (shape known, data
not read) from HF key names; the tree is checked against the model's param shapes first (so a
wrong checkpoint fails before any data is read, naming the key and both shapes), then materialised
one leaf at a time. The same converter therefore also validates a synthetic index of key names and
shapes with no tensor data at all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import jax
import numpy as np

from .config import ModelConfig

_CONVERTERS: dict[str, Callable] = {}


class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing/unexpected keys, wrong shapes, bad files."""


def register_converter(model_type: str):
    def wrap(fn):
        _CONVERTERS[model_type] = fn
        return fn
    return wrap


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
            with safe_open(str(fpath), framework="numpy") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    index[key] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()),
                                  _reader(str(fpath), key))
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


def _reader(fpath: str, key: str):
    def load():
        from safetensors import safe_open
        with safe_open(fpath, framework="numpy") as f:
            return f.get_tensor(key)
    return load


# -- helpers used by the family converters ---------------------------------------------------

def norm(src: TensorSource, prefix: str) -> dict:
    return {"weight": src.take(f"{prefix}.weight")}


def linear(src: TensorSource, prefix: str, bias: bool = False) -> dict:
    """HF nn.Linear [out, in] -> flax Dense {'kernel': [in, out], 'bias': [out]}."""
    out = {"kernel": transpose(src.take(f"{prefix}.weight"))}
    if bias:
        out["bias"] = src.take(f"{prefix}.bias")
    return out


def attention_params(src: TensorSource, prefix: str, qkv_bias: bool, o_bias: bool = False) -> dict:
    return {"q_proj": linear(src, f"{prefix}.q_proj", qkv_bias),
            "k_proj": linear(src, f"{prefix}.k_proj", qkv_bias),
            "v_proj": linear(src, f"{prefix}.v_proj", qkv_bias),
            "o_proj": linear(src, f"{prefix}.o_proj", o_bias)}


def gqa_attention(src: TensorSource, prefix: str, cfg: ModelConfig) -> dict:
    """`self_attn` of a GQAAttention: projections (+ biases), q/k norms, sinks as cfg says."""
    attn = attention_params(src, prefix, cfg.attention_bias, cfg.o_proj_bias)
    if cfg.qk_norm != "none":
        attn["q_norm"] = norm(src, f"{prefix}.q_norm")
        attn["k_norm"] = norm(src, f"{prefix}.k_norm")
    if cfg.attention_sinks:
        attn["sinks"] = src.take(f"{prefix}.sinks")
    return attn


def dense_mlp(src: TensorSource, prefix: str) -> dict:
    """Bias-free SwiGLU MLP (dense layers, shared experts)."""
    return {name: linear(src, f"{prefix}.{name}") for name in ("gate_proj", "up_proj", "down_proj")}


def decoder_params(cfg: ModelConfig, src: TensorSource, layer_fn: Callable[[int, str], dict]) -> dict:
    """The decoder skeleton every family shares: embeddings, final norm, LM head and the two
    per-layer norms; `layer_fn(i, 'model.layers.{i}')` supplies {'self_attn': ..., 'mlp': ...}."""
    params = {"embed_tokens": {"embedding": src.take("model.embed_tokens.weight")},
              "norm": norm(src, "model.norm")}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": transpose(src.take("lm_head.weight"))}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        params[f"layers_{i}"] = {"input_layernorm": norm(src, f"{p}.input_layernorm"),
                                 "post_attention_layernorm": norm(src, f"{p}.post_attention_layernorm"),
                                 **layer_fn(i, p)}
    return params


def llama_experts(src: TensorSource, prefix: str, num_experts: int,
                  names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict:
    """SwiGLU experts -> {'gate_proj' [E, d, I], 'up_proj' [E, d, I], 'down_proj' [E, I, d]}.

    Accepts the per-expert hub layout (`{prefix}.{e}.gate_proj.weight` [I, d] ...) and the fused
    in-memory layout (`{prefix}.gate_up_proj` [E, 2I, d], gate rows first; `{prefix}.down_proj` [E, d, I]).
    """
    g, u, dn = names
    if src.has(f"{prefix}.gate_up_proj"):
        fused = src.take(f"{prefix}.gate_up_proj")
        inter = fused.shape[1] // 2
        return {"gate_proj": transpose(take_slice(fused, 1, 0, inter), (0, 2, 1)),
                "up_proj": transpose(take_slice(fused, 1, inter, 2 * inter), (0, 2, 1)),
                "down_proj": transpose(src.take(f"{prefix}.down_proj"), (0, 2, 1))}
    per = lambda name: stack([transpose(src.take(f"{prefix}.{e}.{name}.weight")) for e in range(num_experts)])
    return {"gate_proj": per(g), "up_proj": per(u), "down_proj": per(dn)}


def routed_moe(src: TensorSource, prefix: str, num_experts: int,
               names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict:
    """A sparse MoE block: router `{prefix}.gate.weight` [E, d] -> {'gate': {'kernel' [d, E]}} plus
    the SwiGLU experts under `{prefix}.experts` (`llama_experts`)."""
    return {"gate": {"kernel": transpose(src.take(f"{prefix}.gate.weight"))},
            **llama_experts(src, f"{prefix}.experts", num_experts, names)}


# -- the whole checkpoint --------------------------------------------------------------------

def lazy_params(cfg: ModelConfig, src: TensorSource) -> dict:
    """Family converter + key and shape validation. Returns a tree of Lazy leaves."""
    from . import families  # noqa: F401
    from .model import param_shapes

    if cfg.model_type not in _CONVERTERS:
        raise CheckpointError(f"no weight converter for model_type {cfg.model_type!r}")
    tree = _CONVERTERS[cfg.model_type](cfg, src)
    unused = src.unused()
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise CheckpointError(f"unexpected keys in {src.where} for {cfg.model_type}: {shown}")
    expected = param_shapes(cfg)
    exp_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_flat = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Lazy))[0]}
    if set(exp_flat) != set(got_flat):
        missing, extra = sorted(set(exp_flat) - set(got_flat)), sorted(set(got_flat) - set(exp_flat))
        raise CheckpointError(f"converter produced a wrong param tree: missing {missing}, extra {extra}")
    for path, want in exp_flat.items():
        got = got_flat[path]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"shape mismatch for {got.origin} (param {path}): checkpoint has {got.shape}, "
                f"config.json implies {tuple(want.shape)}")
    return tree


def materialise(tree, dtype, progress: bool = False, desc: str = "loading") -> dict:
    """Read every Lazy leaf and cast to `dtype` (numpy arrays)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, Lazy))
    it: Iterable = leaves
    if progress:
        from tqdm import tqdm
        it = tqdm(leaves, desc=desc, unit="tensor")
    out = [np.asarray(leaf.load()).astype(dtype) for leaf in it]
    return jax.tree_util.tree_unflatten(treedef, out)
