"""Routed-expert computation (dispatch): every path is exact (dropless) and gives the same output.

All paths take the routing already decided:
  x [N, d] tokens, weights [N, k] combine weights, idx [N, k] expert ids,
  experts {'gate_proj' [E, d, I], 'up_proj' [E, d, I], 'down_proj' [E, I, d],
           optional 'gate_bias' [E, I], 'up_bias' [E, I], 'down_bias' [E, d]}
and return [N, d]. `activation` is 'silu' (SwiGLU) or 'gptoss' (clamped SwiGLU, `limit`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .layers import einsum_f32

GPTOSS_ALPHA = 1.702


def glu(h_gate, h_up, activation: str = "silu", limit: Optional[float] = None):
    """Gated activation of one expert's two projections (any leading shape)."""
    if activation == "silu":
        return jax.nn.silu(h_gate) * h_up
    if activation == "gptoss":  # gate clamped above only, up clamped both sides, (up + 1) * glu
        g = jnp.minimum(h_gate, limit)
        u = jnp.clip(h_up, -limit, limit)
        return (u + 1) * g * jax.nn.sigmoid(GPTOSS_ALPHA * g)
    raise ValueError(f"unknown expert activation {activation!r}")


def _bias(experts, name, idx=None):
    b = experts.get(name)
    if b is None:
        return 0.0
    return b if idx is None else b[idx]


def dispatch_dense(x, weights, idx, experts, activation="silu", limit=None):
    """Reference path: run every expert on every token, combine with a sparse [N, E] weight matrix.

    E/k times the FLOPs of the sparse paths; the ground truth in tests, and fine for tiny E.
    """
    E = experts["gate_proj"].shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None].astype(jnp.float32), axis=1)
    hg = jnp.einsum("nd,edi->nei", x, experts["gate_proj"]) + _bias(experts, "gate_bias")
    hu = jnp.einsum("nd,edi->nei", x, experts["up_proj"]) + _bias(experts, "up_bias")
    h = glu(hg, hu, activation, limit)
    out = einsum_f32("nei,eid->ned", h, experts["down_proj"]) + _bias(experts, "down_bias")
    return jnp.einsum("ned,ne->nd", out, combine).astype(x.dtype)


def dispatch_gather(x, weights, idx, experts, activation="silu", limit=None):
    """Decode path: gather the k chosen experts' weights per token ([N, k, d, I]); cheap for tiny N."""
    wg, wu, wd = experts["gate_proj"][idx], experts["up_proj"][idx], experts["down_proj"][idx]
    hg = jnp.einsum("nd,nkdi->nki", x, wg) + _bias(experts, "gate_bias", idx)
    hu = jnp.einsum("nd,nkdi->nki", x, wu) + _bias(experts, "up_bias", idx)
    h = glu(hg, hu, activation, limit)
    out = einsum_f32("nki,nkid->nkd", h, wd) + _bias(experts, "down_bias", idx)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(jnp.float32)).astype(x.dtype)


DISPATCH = {"dense": dispatch_dense, "gather": dispatch_gather}


def dispatch(x, weights, idx, experts, method: str = "auto", activation: str = "silu",
             limit: Optional[float] = None):
    """Pick a dispatch path. 'auto': gather for a handful of tokens (decode), dense otherwise."""
    if method == "auto":
        method = "gather" if x.shape[0] * idx.shape[1] <= experts["gate_proj"].shape[0] else "dense"
    if method not in DISPATCH:
        raise ValueError(f"unknown MoE dispatch {method!r}; choose from auto, {', '.join(DISPATCH)}")
    return DISPATCH[method](x, weights, idx, experts, activation, limit)
