"""The MoE block: router (+ delta) -> routing -> routed experts (+ shared expert).

This is the only place a delta enters the model: `delta [B, E]` is added to the raw router logits
right after the linear (and the gpt-oss router bias), before any softmax / sigmoid / group choice /
top-k, so it moves the choice of experts, of groups, and their weights alike. The shared expert and
Qwen2-MoE's `shared_expert_gate` have no delta: they are not among the E routed logits.

It is also the only place a routing override (`RouteOverride`, C3PO's re-mixed pathways) acts: the
router's pathway scores (softmax over E; DeepSeek-V3: sigmoid) are re-mixed towards a target and
the router's own selection rule picks the top-k and combine weights from them (routers.py,
`pathway_scores` / `route_scores`). Without an override the program is today's, bit for bit.

  routers.py   the router table (kind -> routing function), token confidence (Eq. 2)
  dispatch.py  how the routed experts are computed (dense / gather / blocked / ragged; all exact)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .attention import linear
from .config import ModelConfig
from .dispatch import dispatch
from .expert_parallel import moe_dispatch
from .layers import swiglu
from .routers import pathway_scores, route, route_scores, token_confidence

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")


class RouteOverride(NamedTuple):
    """A per-row override of the routing of the MoE layers (C3PO re-mixing, rewire_jax/eval/c3po.py).

    At MoE layer r (row r of the deltas) of sequence b, at every token whose position is >= start[b],
    the router's pathway scores s [E] (`routers.pathway_scores`: the softmax over all E of the router
    logits + delta; DeepSeek-V3: their sigmoid) become

        s' = alpha[b, r] * s + (1 - alpha[b, r]) * target[b, r]

    and the router's own selection rule turns s' into experts and combine weights
    (`routers.route_scores`: group choice, top-k, the scores at the chosen k, renormalised where the
    router renormalises). alpha = 1 keeps the router's own output exactly (the native path is
    selected, not recomputed); alpha = 0 replaces it by the target. start = 0: every token (prompt
    and generated); start = prompt length - 1: the last prompt token and every generated one.
    """

    target: Any   # [B, L_moe, E] fp32
    alpha: Any    # [B, L_moe] fp32 in [0, 1]
    start: Any    # [B] int32


def _override_routing(flat, weights, idx, override, cfg: ModelConfig, correction, B: int, T: int):
    """The routing under one layer's override (target [B, E], alpha [B], active [B, T] bool)."""
    target, alpha, active = override
    s = pathway_scores(flat, cfg).reshape(B, T, -1)
    a = alpha.astype(jnp.float32)[:, None, None]
    mixed = a * s + (1.0 - a) * target.astype(jnp.float32)[:, None, :]
    w, i = route_scores(mixed.reshape(B * T, -1), cfg, correction)
    use = (active & (alpha[:, None] < 1.0)).reshape(B * T, 1)
    return jnp.where(use, w, weights), jnp.where(use, i, idx)


def moe_block(p, x, delta, cfg: ModelConfig, dispatch_method: Optional[str] = None, expert_layer=None,
              override=None):
    """x [B, T, d]; delta [B, E] fp32 -> (y [B, T, d], aux {'logits' [B, T, E], 'idx' [B, T, k],
    'score' [B, T] (token confidence)}). expert_layer: None, or the index into the expert weights'
    leading layer axis when they are passed stacked (inside the scan over layers). override: None,
    or this layer's (target [B, E], alpha [B], active [B, T] bool) of a `RouteOverride` (aux 'idx'
    and 'score' are then those of the experts used; 'logits' stay the router's own)."""
    B, T, d = x.shape
    with jax.named_scope("router"):
        logits = linear(x, p["router"], p.get("router_bias")).astype(jnp.float32) + delta[:, None, :]
        flat = logits.reshape(B * T, -1)
        weights, idx = route(flat, cfg, p.get("correction_bias"))
        if override is not None:
            weights, idx = _override_routing(flat, weights, idx, override, cfg, p.get("correction_bias"), B, T)
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
