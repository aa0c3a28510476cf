"""Every weight of a model, declared once: shape, dtype, logical axes, init and its HF key.

Everything that touches weights reads these declarations: `init_params` / `param_shapes`, HF loading
(`rewire_jax.io.hf`), HF export (`rewire_jax.io.export`), the converted orbax layout, and sharding
(`logical_axes`, one name per dimension, e.g. ("experts", "embed", "mlp")).

Param tree (a plain nested dict):

    {"embed": [V, d], "final_norm": [d], "lm_head": [d, V] (absent when tied),
     "stacks": {"0": {"0": layer tree, ...}, ...}}

Decoder layers are grouped into *stacks* (`layer_plan`): stack s repeats a unit of `unit`
consecutive, identical layers `repeats` times (DeepSeek's dense first layers are a stack of their
own, gpt-oss's sliding/full alternation is a unit of 2). Sub-layer j of the unit has one layer tree
whose every leaf carries a leading [repeats] axis (logical axis "layers"), so the transformer runs
a stack as one `lax.scan`: compile time does not grow with depth.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

#: Longest repeated unit of layers looked for by `layer_plan`.
MAX_UNIT = 4
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class HF:
    """Where a weight lives in an HF checkpoint, and how it is transformed.

    kind  'id'       the tensor as stored
          't'        a 2-D `nn.Linear` weight [out, in], stored here as [in, out]
          'experts'  SwiGLU experts: per-expert `{key}.{e}.{part}.weight` [out, in] stacked to
                     [E, in, out] (also read: the fused `{key}.gate_up_proj` [E, 2I, d] and
                     `{key}.down_proj` [E, d, I] that transformers keeps in memory)
          'gptoss'   gpt-oss experts: `{key}.gate_up_proj` [E, d, 2I] with gate / up interleaved
                     in the columns, `{key}.down_proj` [E, I, d] and their biases (or MXFP4
                     `_blocks` / `_scales`); part is gate|up|down|gate_bias|up_bias|down_bias
          'cat'      a fused weight: the tensors of the mappings `parts` (each read as its own kind)
                     joined along the last axis, `sizes` wide each (q | k | v, gate | up); export
                     splits it there and writes each part back as that part's kind
    key: the full key for model-level weights; relative to `model.layers.{i}.` for layer weights.
    """

    kind: str
    key: str = ""
    part: str = ""
    parts: tuple = ()
    sizes: tuple = ()

    def __post_init__(self):
        assert (self.kind == "cat") == bool(self.parts) and len(self.parts) == len(self.sizes), self


@dataclasses.dataclass(frozen=True)
class Weight:
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]   # logical axis names, one per dimension
    hf: HF
    init: str = "normal"              # 'normal' (std 0.02) | 'ones' | 'zeros'
    fp32: bool = False                # float32 whatever the model dtype (DeepSeek-V3's correction bias)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)

    def dtype(self, cfg: ModelConfig):
        return jnp.float32 if self.fp32 else cfg.jnp_dtype

    def parts(self) -> list["Weight"]:
        """A fused ('cat') weight's parts as weights of their own: the same shape but for the last
        axis (`hf.sizes[i]` wide), each with its own HF mapping."""
        return [dataclasses.replace(self, shape=self.shape[:-1] + (n,), hf=h)
                for h, n in zip(self.hf.parts, self.hf.sizes)]

    def stacked(self, repeats: int) -> "Weight":
        return dataclasses.replace(self, shape=(repeats, *self.shape), axes=("layers", *self.axes))


# -- the plan of layers ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stack:
    """Decoder layers first .. first + unit * repeats - 1: a unit of `unit` layers, `repeats` times."""

    first: int
    unit: int
    repeats: int

    def layer(self, rep: int, sub: int) -> int:
        return self.first + rep * self.unit + sub

    @property
    def stop(self) -> int:
        return self.first + self.unit * self.repeats


def layer_kind(cfg: ModelConfig, layer: int) -> tuple:
    """What makes two decoder layers share a program: MoE or dense, and the attention window."""
    return cfg.is_moe(layer), cfg.window(layer)


@functools.lru_cache(maxsize=256)
def layer_plan(cfg: ModelConfig) -> tuple[Stack, ...]:
    """Greedy split of the layers into stacks: at each layer, the unit (1..MAX_UNIT layers) whose
    repetitions cover the most layers (ties: the shorter unit)."""
    kinds = [layer_kind(cfg, i) for i in range(cfg.num_layers)]
    out, i = [], 0
    while i < cfg.num_layers:
        best = (1, 1)
        for unit in range(1, MAX_UNIT + 1):
            if i + unit > cfg.num_layers:
                break
            reps = 1
            while (i + (reps + 1) * unit <= cfg.num_layers
                   and kinds[i + reps * unit:i + (reps + 1) * unit] == kinds[i:i + unit]):
                reps += 1
            if reps >= 2 and unit * reps > best[0] * best[1]:
                best = (unit, reps)
        out.append(Stack(i, *best))
        i += best[0] * best[1]
    return tuple(out)


def stack_of(cfg: ModelConfig, layer: int) -> tuple[int, int, int]:
    """Decoder layer -> (stack index, repeat, sub-layer)."""
    for s, st in enumerate(layer_plan(cfg)):
        if st.first <= layer < st.stop:
            rep, sub = divmod(layer - st.first, st.unit)
            return s, rep, sub
    raise IndexError(f"layer {layer} out of range for {cfg.num_layers} layers")


# -- declarations ------------------------------------------------------------------------------

def _linear(key: str, n_in: int, n_out: int, axes) -> Weight:
    return Weight((n_in, n_out), axes, HF("t", key + ".weight"))


def _vector(key: str, n: int, axis: str, init: str = "zeros") -> Weight:
    return Weight((n,), (axis,), HF("id", key), init)


def _joined(parts: tuple, sizes: tuple) -> HF:
    return HF("cat", parts=tuple(parts), sizes=tuple(sizes))


def _gqa(cfg: ModelConfig) -> dict:
    """q, k, v as one fused projection `qkv_proj` [d, (H + 2K) * D] (columns q | k | v: one matmul
    per layer), joined from HF's q_proj / k_proj / v_proj at load and split at export."""
    d, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sizes = (H * D, K * D, K * D)
    qkv = _joined((HF("t", f"self_attn.{n}_proj.weight") for n in "qkv"), sizes)
    # the fused columns shard like the query heads (tensor); GSPMD reshards at the q | k | v split
    w = {"qkv_proj": Weight((d, sum(sizes)), ("embed", "q_heads"), qkv),
         "o_proj": _linear("self_attn.o_proj", H * D, d, ("q_heads", "embed"))}
    if cfg.attention_bias:
        w["qkv_bias"] = Weight((sum(sizes),), ("q_heads",),
                               _joined((HF("id", f"self_attn.{n}_proj.bias") for n in "qkv"), sizes), "zeros")
    if cfg.o_proj_bias:
        w["o_bias"] = _vector("self_attn.o_proj.bias", d, "embed")
    if cfg.qk_norm == "flat":    # OLMoE: one norm over all heads
        w.update(q_norm=_vector("self_attn.q_norm.weight", H * D, "q_heads", "ones"),
                 k_norm=_vector("self_attn.k_norm.weight", K * D, "kv_heads", "ones"))
    elif cfg.qk_norm == "head":  # Qwen3: per head
        w.update(q_norm=_vector("self_attn.q_norm.weight", D, "head_dim", "ones"),
                 k_norm=_vector("self_attn.k_norm.weight", D, "head_dim", "ones"))
    if cfg.attention_sinks:
        w["sinks"] = Weight((H,), ("heads",), HF("id", "self_attn.sinks"))
    return w


def _mla(cfg: ModelConfig) -> dict:
    m, d, H = cfg.mla, cfg.hidden_size, cfg.num_heads
    w = {}
    if m.q_lora_rank is None:
        w["q_proj"] = _linear("self_attn.q_proj", d, H * m.qk_head_dim, ("embed", "q_heads"))
    else:
        w["q_a_proj"] = _linear("self_attn.q_a_proj", d, m.q_lora_rank, ("embed", "latent"))
        if cfg.attention_bias:
            w["q_a_bias"] = _vector("self_attn.q_a_proj.bias", m.q_lora_rank, "latent")
        w["q_a_norm"] = _vector("self_attn.q_a_layernorm.weight", m.q_lora_rank, "latent", "ones")
        w["q_b_proj"] = _linear("self_attn.q_b_proj", m.q_lora_rank, H * m.qk_head_dim, ("latent", "q_heads"))
    kv_a = m.kv_lora_rank + m.qk_rope_head_dim
    w["kv_a_proj"] = _linear("self_attn.kv_a_proj_with_mqa", d, kv_a, ("embed", "latent"))
    if cfg.attention_bias:
        w["kv_a_bias"] = _vector("self_attn.kv_a_proj_with_mqa.bias", kv_a, "latent")
    w["kv_a_norm"] = _vector("self_attn.kv_a_layernorm.weight", m.kv_lora_rank, "latent", "ones")
    w["kv_b_proj"] = _linear("self_attn.kv_b_proj", m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim),
                             ("latent", "q_heads"))
    w["o_proj"] = _linear("self_attn.o_proj", H * m.v_head_dim, d, ("q_heads", "embed"))
    if cfg.attention_bias:
        w["o_bias"] = _vector("self_attn.o_proj.bias", d, "embed")
    return w


def _swiglu(prefix: str, d: int, width: int, names=("gate_proj", "up_proj", "down_proj"), tag: str = "") -> dict:
    """A SwiGLU's gate and up projections fused as `gate_up_proj` [d, 2 * width] (gate = the first
    `width` columns, up the rest), joined from HF's two nn.Linear at load; down_proj [width, d]."""
    g, u, dn = names
    gate_up = _joined((HF("t", f"{prefix}.{g}.weight"), HF("t", f"{prefix}.{u}.weight")), (width, width))
    return {f"{tag}gate_up_proj": Weight((d, 2 * width), ("embed", "mlp"), gate_up),
            f"{tag}down_proj": _linear(f"{prefix}.{dn}", width, d, ("mlp", "embed"))}


def _moe(cfg: ModelConfig) -> dict:
    d, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    gptoss = cfg.expert_activation == "gptoss"
    mixtral = cfg.model_type == "mixtral"
    mlp = "block_sparse_moe" if mixtral else "mlp"
    router = f"{mlp}.router" if gptoss else f"{mlp}.gate"
    w = {"router": _linear(router, d, E, ("embed", "experts"))}
    if cfg.router.bias:
        w["router_bias"] = _vector(f"{router}.bias", E, "experts")
    if cfg.router.kind == "sigmoid_group":   # DeepSeek-V3: moves the choice only (an fp32 buffer)
        w["correction_bias"] = Weight((E,), ("experts",), HF("id", f"{mlp}.gate.e_score_correction_bias"),
                                      "zeros", fp32=True)
    up_axes, down_axes = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
    # routed experts: gate | up fused as gate_up_proj [E, d, 2I] (halves, not interleaved)
    ex = f"{mlp}.experts"
    if gptoss:
        part = lambda p: HF("gptoss", ex, p)
        w.update(gate_up_proj=Weight((E, d, 2 * I), up_axes, _joined((part("gate"), part("up")), (I, I))),
                 down_proj=Weight((E, I, d), down_axes, part("down")),
                 gate_up_bias=Weight((E, 2 * I), ("experts", "mlp"),
                                     _joined((part("gate_bias"), part("up_bias")), (I, I)), "zeros"),
                 down_bias=Weight((E, d), ("experts", "embed"), part("down_bias"), "zeros"))
    else:
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        w.update(gate_up_proj=Weight((E, d, 2 * I), up_axes,
                                     _joined((HF("experts", ex, names[0]), HF("experts", ex, names[1])), (I, I))),
                 down_proj=Weight((E, I, d), down_axes, HF("experts", ex, names[2])))
    if cfg.shared_expert_size:
        shared = "mlp.shared_experts" if cfg.model_type.startswith("deepseek") else "mlp.shared_expert"
        w.update(_swiglu(shared, d, cfg.shared_expert_size, tag="shared_"))
        if cfg.shared_expert_gate:
            w["shared_gate"] = _linear("mlp.shared_expert_gate", d, 1, ("embed", None))
    return w


def _layer_norms(cfg: ModelConfig) -> dict:
    d = cfg.hidden_size
    return {"input_norm": _vector("input_layernorm.weight", d, "embed", "ones"),
            "post_norm": _vector("post_attention_layernorm.weight", d, "embed", "ones")}


def _dense_mlp(cfg: ModelConfig) -> dict:
    return _swiglu("mlp", cfg.hidden_size, cfg.intermediate_size)


def layer_weights(cfg: ModelConfig, layer: int) -> dict:
    """Declarations of one decoder layer: {'input_norm', 'post_norm', 'attn': {...}, 'mlp': {...}}."""
    return {**_layer_norms(cfg), "attn": _mla(cfg) if cfg.attention == "mla" else _gqa(cfg),
            "mlp": _moe(cfg) if cfg.is_moe(layer) else _dense_mlp(cfg)}


def model_weights(cfg: ModelConfig) -> dict:
    """Declarations of the weights outside the decoder layers."""
    V, d = cfg.vocab_size, cfg.hidden_size
    w = {"embed": Weight((V, d), ("vocab", "embed"), HF("id", "model.embed_tokens.weight")),
         "final_norm": Weight((d,), ("embed",), HF("id", "model.norm.weight"), "ones")}
    if not cfg.tie_word_embeddings:
        w["lm_head"] = Weight((d, V), ("embed", "vocab"), HF("t", "lm_head.weight"))
    return w


def declarations(cfg: ModelConfig) -> dict:
    """The whole param tree as `Weight` leaves, stacked shapes (leading [repeats]) in the stacks."""
    tree = model_weights(cfg)
    tree["stacks"] = {
        str(s): {str(j): jax.tree.map(lambda w: w.stacked(st.repeats), layer_weights(cfg, st.layer(0, j)),
                                      is_leaf=_is_weight)
                 for j in range(st.unit)}
        for s, st in enumerate(layer_plan(cfg))}
    return tree


def _is_weight(x) -> bool:
    return isinstance(x, Weight)


def map_weights(fn, tree):
    """tree.map over a declarations tree (Weight leaves)."""
    return jax.tree.map(fn, tree, is_leaf=_is_weight)


def logical_axes(cfg: ModelConfig) -> dict:
    """Param tree of logical axis-name tuples (what sharding rules map to mesh axes)."""
    return map_weights(lambda w: w.axes, declarations(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """Param tree of jax.ShapeDtypeStruct, nothing allocated."""
    return map_weights(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype(cfg)), declarations(cfg))


def init_weight(w: Weight, cfg: ModelConfig, key):
    """A fresh array for one declaration: normal(0.02) matrices, ones (norms), zeros (biases)."""
    dt = w.dtype(cfg)
    if w.init == "ones":
        return jnp.ones(w.shape, dt)
    if w.init == "zeros":
        return jnp.zeros(w.shape, dt)
    return (jax.random.normal(key, w.shape, jnp.float32) * INIT_STD).astype(dt)


def init_params(cfg: ModelConfig, key) -> dict:
    """Random parameters (normal(0.02) matrices, unit norms, zero biases), e.g. to train from scratch."""
    decl = declarations(cfg)
    leaves, treedef = jax.tree.flatten(decl, is_leaf=_is_weight)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [init_weight(w, cfg, k) for w, k in zip(leaves, keys)])


def layer_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    """The (unstacked) weights of one decoder layer, e.g. to inspect them."""
    s, rep, sub = stack_of(cfg, layer)
    return jax.tree.map(lambda a: a[rep], params["stacks"][str(s)][str(sub)])


def num_params(params: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
