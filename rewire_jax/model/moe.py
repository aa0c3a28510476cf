"""The MoE block: router (+ delta) -> routing -> routed experts (+ shared expert).

This is the only place a delta enters the model: `delta [B, E]` is added to the raw router logits
right after the linear (and the gpt-oss router bias), before any softmax / sigmoid / group choice /
top-k, so it moves the choice of experts, of groups, and their weights alike. The shared expert and
Qwen2-MoE's `shared_expert_gate` have no delta: they are not among the E routed logits.

  routers.py   the router table (kind -> routing function), token confidence (Eq. 2)
  dispatch.py  how the routed experts are computed (dense / gather / blocked / ragged; all exact)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .attention import linear
from .config import ModelConfig
from .dispatch import dispatch
from .expert_parallel import moe_dispatch
from .layers import swiglu
from .routers import route, token_confidence

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")


def moe_block(p, x, delta, cfg: ModelConfig, dispatch_method: Optional[str] = None, expert_layer=None):
    """x [B, T, d]; delta [B, E] fp32 -> (y [B, T, d], aux {'logits' [B, T, E], 'idx' [B, T, k],
    'score' [B, T] (token confidence)}). expert_layer: None, or the index into the expert weights'
    leading layer axis when they are passed stacked (inside the scan over layers)."""
    B, T, d = x.shape
    with jax.named_scope("router"):
        logits = linear(x, p["router"], p.get("router_bias")).astype(jnp.float32) + delta[:, None, :]
        flat = logits.reshape(B * T, -1)
        weights, idx = route(flat, cfg, p.get("correction_bias"))
    with jax.named_scope("experts"):
        experts = {n: p[n] for n in EXPERT_WEIGHTS if n in p}
        if cfg.mesh is not None:   # expert-parallel in shard_map (model/expert_parallel.py)
            k = idx.shape[-1]
            y = moe_dispatch(x, weights.astype(cfg.jnp_dtype).reshape(B, T, k), idx.reshape(B, T, k), experts,
                             cfg, dispatch_method or cfg.dispatch, expert_layer)
        else:
            y = dispatch(x.reshape(B * T, d), weights.astype(cfg.jnp_dtype), idx, experts,
                         dispatch_method or cfg.dispatch, cfg.expert_activation, cfg.swiglu_limit,
                         expert_layer).reshape(B, T, d)
    if cfg.shared_expert_size:
        with jax.named_scope("shared_expert"):
            shared = swiglu(x, p["shared_gate_proj"], p["shared_up_proj"], p["shared_down_proj"])
            if cfg.shared_expert_gate:
                shared = jax.nn.sigmoid(linear(x, p["shared_gate"])) * shared
            y = y + shared
    aux = {"logits": logits, "idx": idx.reshape(B, T, -1), "score": token_confidence(flat, idx).reshape(B, T)}
    return y, aux


def dense_mlp(p, x):
    """Bias-free SwiGLU (dense layers)."""
    return swiglu(x, p["gate_proj"], p["up_proj"], p["down_proj"])
