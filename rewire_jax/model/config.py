"""Model configuration: one frozen, hashable dataclass shared by every MoE family.

The config is static under `jax.jit` (it is hashable), so it is passed as a static argument and
never traced. HF `config.json` dicts are turned into a `ModelConfig` by the family table in
`rewire_jax.io.families`; the weights a config implies are declared in `rewire_jax.model.weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .routers import ROUTERS


class ConfigError(ValueError):
    """A config.json that rewire-jax cannot turn into a model (unsupported type, bad values)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. `rope_type` is 'default' or 'yarn'; YaRN fields follow HF names."""

    theta: float = 10000.0
    dim: int = 0  # rotary dims per head; 0 = the whole head_dim
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True
    interleaved: bool = False  # DeepSeek pairs (x[2i], x[2i+1]); everyone else rotate-half


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention. q_lora_rank None = a plain q_proj (V2-Lite)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


#: per-layer rematerialisation (rewire_jax.model.transformer.use_remat)
REMAT_MODES = ("auto", "layer", "none")

#: MoE dispatch paths (rewire_jax.model.dispatch); 'auto' picks per backend and shape
DISPATCH_METHODS = ("auto", "dense", "gather", "blocked", "ragged", "kernel")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How router logits z~ = x W (+ b) + delta become (weights, experts); see rewire_jax/routers.py.

    kind: 'softmax_topk'  softmax over all E, top-k (OLMoE, Qwen, Mixtral, DeepSeek greedy)
          'group_limited' DeepSeek-V2: keep the topk_group groups with the largest max p, top-k inside
          'topk_softmax'  gpt-oss: top-k of the logits, softmax over those k
          'sigmoid_group' DeepSeek-V3 noaux_tc: sigmoid scores + correction bias, groups by top-2 sums
    """

    kind: str = "softmax_topk"
    bias: bool = False                  # gpt-oss router bias
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # DeepSeek: multiplies the combine weights


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE LM (all sizes are per layer unless noted).

    `moe_layers` lists the decoder-layer indices that have a router; row r of the deltas
    `[L_moe, E]` belongs to decoder layer `moe_layers[r]`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_layers: tuple[int, ...]
    intermediate_size: int = 0  # dense-MLP width (dense layers only)
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qk_norm: str = "none"  # 'none' | 'flat' (OLMoE: over all heads) | 'head' (Qwen3: per head)
    clip_qkv: Optional[float] = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    dtype: str = "float32"  # parameter / activation dtype; router softmax, deltas, loss stay fp32
    # -- attention variants
    attention: str = "gqa"  # 'gqa' | 'mla' (DeepSeek; dims in `mla`)
    mla: Optional[MLAConfig] = None
    o_proj_bias: bool = False  # gpt-oss
    attention_sinks: bool = False  # gpt-oss: one learned logit per head in the softmax denominator
    sliding_window: Optional[int] = None  # keys visible: the last `sliding_window` positions
    sliding_layers: tuple[int, ...] = ()  # decoder layers that use the window (others: full)
    # -- MoE variants
    router: RouterConfig = RouterConfig()
    expert_activation: str = "silu"  # 'silu' (SwiGLU) | 'gptoss' (clamped, interleaved on disk)
    expert_bias: bool = False  # gpt-oss: biases on the expert projections
    swiglu_limit: Optional[float] = None
    shared_expert_size: int = 0  # width of the always-on shared MLP (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x w) scales the shared MLP (no delta)
    # -- execution (not architecture): how the routed experts are computed; every path is exact
    dispatch: str = "auto"  # one of DISPATCH_METHODS; per call: forward(..., dispatch=...)
    scan_layers: Optional[bool] = None  # run stacks of identical layers as a scan; None: auto (transformer.scan_stack)
    remat: str = "auto"  # per-layer rematerialisation under autodiff: 'auto' (long contexts), 'layer', 'none'
    mesh: Optional[Any] = None  # a jax.sharding.Mesh (model/sharding.py): batch + experts sharded; not serialised
    # the flax.nnx module graph to run (model/decoder.py ModelGraph), set by `Model.with_module` for a
    # customised model; None: the stock modules of this config. Not serialised.
    modules: Optional[Any] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                f"{self.num_experts}]")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}; use 'float32', 'bfloat16' or 'float16'")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ConfigError(f"moe_layers {self.moe_layers} out of range for {self.num_layers} layers")
        if self.attention not in ("gqa", "mla") or (self.attention == "mla") != (self.mla is not None):
            raise ConfigError(f"attention={self.attention!r} needs mla settings exactly when 'mla'")
        if self.sliding_layers and not self.sliding_window:
            raise ConfigError(f"sliding_layers {self.sliding_layers} given without a sliding_window")
        r = self.router
        if r.kind not in ROUTERS:
            raise ConfigError(f"router kind {r.kind!r}; expected one of {', '.join(ROUTERS)}")
        if r.kind in ("group_limited", "sigmoid_group"):
            if self.num_experts % r.n_group or not 0 < r.topk_group <= r.n_group:
                raise ConfigError(f"n_group={r.n_group} must divide num_experts={self.num_experts} and "
                                  f"topk_group={r.topk_group} must be in [1, n_group]")
            if r.topk_group * (self.num_experts // r.n_group) < self.num_experts_per_tok:
                raise ConfigError(f"topk_group={r.topk_group} groups of {self.num_experts // r.n_group} "
                                  f"experts cannot hold num_experts_per_tok={self.num_experts_per_tok}")
        if self.expert_activation not in ("silu", "gptoss"):
            raise ConfigError(f"expert_activation {self.expert_activation!r}; use 'silu' or 'gptoss'")
        if self.dispatch not in DISPATCH_METHODS:
            raise ConfigError(f"dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_METHODS)}")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"remat {self.remat!r}; choose one of {', '.join(REMAT_MODES)}")
        if self.expert_activation == "gptoss" and self.swiglu_limit is None:
            raise ConfigError("expert_activation='gptoss' needs swiglu_limit")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.num_moe_layers, self.num_experts)

    def window(self, layer: int) -> Optional[int]:
        """Sliding-window size of decoder layer `layer`, or None for full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def moe_index(self, layer: int) -> Optional[int]:
        """Row of the deltas for decoder layer `layer`, or None for a dense layer."""
        return self.moe_layers.index(layer) if layer in self.moe_layers else None

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # -- (de)serialisation of our own format (converted checkpoints) ------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.replace(mesh=None, modules=None))
        d.pop("mesh")
        d.pop("modules")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d.pop("mesh", None)
        d.pop("modules", None)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["router"] = RouterConfig(**d.get("router", {}))
        if d.get("mla") is not None:
            d["mla"] = MLAConfig(**d["mla"])
        for key in ("moe_layers", "eos_token_ids", "sliding_layers"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)
