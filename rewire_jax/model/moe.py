"""The MoE block (a flax.nnx module): router (+ delta) -> routing -> routed experts (+ shared expert).

This is the only place a delta enters the model: `delta [B, E]` is added to the raw router logits
right after the linear (and the gpt-oss router bias), before any softmax / sigmoid / group choice /
top-k, so it moves the choice of experts, of groups, and their weights alike. The shared expert and
Qwen2-MoE's `shared_expert_gate` have no delta: they are not among the E routed logits.

It is also the only place a routing override (`RouteOverride`, C3PO's re-mixed pathways) acts: the
router's pathway scores (softmax over E; DeepSeek-V3: sigmoid) are re-mixed towards a target and
the router's own selection rule picks the top-k and combine weights from them (routers.py,
`pathway_scores` / `route_scores`). Without an override the program is today's, bit for bit.

  routers.py   the router table (kind -> Router module: the block's `routing`), token confidence (Eq. 2)
  dispatch.py  how the routed experts are computed (dense / gather / blocked / ragged / kernel; all exact)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import linear
from .config import ModelConfig
from .dispatch import dispatch
from .expert_parallel import moe_dispatch
from .layers import swiglu
from .nn import Execution, arch, declare, stacked, value
from .routers import router_for, token_confidence
from .weights import _dense_mlp, _moe

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


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


class MoEBlock(nnx.Module):
    """Router + delta -> routing (`self.routing`, a `routers.Router`) -> routed experts (+ shared
    expert). Params: `weights.py` `_moe` (the router weight and biases, the routed experts stacked
    [E, ...], the shared expert); the routing rule has none, so it can be swapped freely."""

    def __init__(self, cfg: ModelConfig, *, repeats: Optional[int] = None, weights: Optional[dict] = None,
                 rngs: Optional[nnx.Rngs] = None):
        self.cfg = arch(cfg)
        declare(self, stacked(_moe(cfg), repeats), cfg, weights, rngs)
        self.routing = router_for(cfg)

    def router_logits(self, x, delta):
        """x [B, T, d]; delta [B, E] fp32 -> z~ = x W (+ b) + delta [B, T, E] fp32."""
        return linear(x, value(self, "router"), value(self, "router_bias")).astype(jnp.float32) + delta[:, None, :]

    def override_routing(self, flat, weights, idx, override, B: int, T: int):
        """The routing under one layer's override (target [B, E], alpha [B], active [B, T] bool)."""
        target, alpha, active = override
        s = self.routing.pathway(flat).reshape(B, T, -1)
        a = alpha.astype(jnp.float32)[:, None, None]
        mixed = a * s + (1.0 - a) * target.astype(jnp.float32)[:, None, :]
        w, i = self.routing.select(mixed.reshape(B * T, -1), value(self, "correction_bias"))
        use = (active & (alpha[:, None] < 1.0)).reshape(B * T, 1)
        return jnp.where(use, w, weights), jnp.where(use, i, idx)

    def routed_experts(self, x, weights, idx, expert_layer=None, run: Execution = Execution()):
        """x [B, T, d]; weights [N, k] fp32; idx [N, k] (N = B * T) -> [B, T, d] by the dispatch path
        `run.dispatch` (all exact; rewire_jax/model/dispatch.py), expert-parallel under `run.mesh`."""
        cfg = self.cfg
        B, T, d = x.shape
        experts = {n: getattr(self, n)[...] for n in EXPERT_WEIGHTS if hasattr(self, n)}
        if run.mesh is not None:   # expert-parallel in shard_map (model/expert_parallel.py)
            k = idx.shape[-1]
            return moe_dispatch(x, weights.astype(cfg.jnp_dtype).reshape(B, T, k), idx.reshape(B, T, k), experts,
                                cfg.replace(mesh=run.mesh), run.dispatch, expert_layer)
        return dispatch(x.reshape(B * T, d), weights.astype(cfg.jnp_dtype), idx, experts, run.dispatch,
                        cfg.expert_activation, cfg.swiglu_limit, expert_layer).reshape(B, T, d)

    def shared_expert(self, x):
        """The always-on shared SwiGLU (Qwen2-MoE: sigmoid-gated; it has no delta)."""
        w = functools.partial(value, self)
        shared = swiglu(x, w("shared_gate_up_proj"), w("shared_down_proj"))
        if self.cfg.shared_expert_gate:
            shared = jax.nn.sigmoid(linear(x, w("shared_gate"))) * shared
        return shared

    def __call__(self, x, delta, *, expert_layer=None, override=None, run: Execution = Execution()):
        """x [B, T, d]; delta [B, E] fp32 -> (y [B, T, d], aux {'logits' [B, T, E], 'idx' [B, T, k],
        'score' [B, T] (token confidence)}). expert_layer: None, or the index into the expert weights'
        leading layer axis when they are passed stacked (inside the scan over layers). override: None,
        or this layer's (target [B, E], alpha [B], active [B, T] bool) of a `RouteOverride` (aux 'idx'
        and 'score' are then those of the experts used; 'logits' stay the router's own)."""
        B, T, d = x.shape
        with jax.named_scope("router"):
            logits = self.router_logits(x, delta)
            flat = logits.reshape(B * T, -1)
            weights, idx = self.routing(flat, value(self, "correction_bias"))
            if override is not None:
                weights, idx = self.override_routing(flat, weights, idx, override, B, T)
        with jax.named_scope("experts"):
            y = self.routed_experts(x, weights, idx, expert_layer, run)
        if self.cfg.shared_expert_size:
            with jax.named_scope("shared_expert"):
                y = y + self.shared_expert(x)
        aux = {"logits": logits, "idx": idx.reshape(B, T, -1), "score": token_confidence(flat, idx).reshape(B, T)}
        return y, aux


class DenseMLP(nnx.Module):
    """Bias-free SwiGLU of the dense layers. Params: gate_up_proj [d, 2I] (gate | up), down_proj [I, d]."""

    def __init__(self, cfg: ModelConfig, *, repeats: Optional[int] = None, weights: Optional[dict] = None,
                 rngs: Optional[nnx.Rngs] = None):
        self.cfg = arch(cfg)
        declare(self, stacked(_dense_mlp(cfg), repeats), cfg, weights, rngs)

    def __call__(self, x):
        return swiglu(x, self.gate_up_proj[...], self.down_proj[...])


def moe_block(p, x, delta, cfg: ModelConfig, dispatch_method: Optional[str] = None, expert_layer=None,
              override=None):
    """`MoEBlock` of the stock modules over the weights `p` (a layer's `mlp` tree); see its __call__."""
    return MoEBlock(cfg, weights=p)(x, delta, expert_layer=expert_layer, override=override,
                                    run=Execution.of(cfg, dispatch_method))
