"""Routed-expert computation (dispatch): every path is exact (dropless) and gives the same output.

All functions take the routing already decided:
  x [N, d] tokens, weights [N, k] combine weights, idx [N, k] expert ids,
  expert params {'gate_proj' [E, d, I], 'up_proj' [E, d, I], 'down_proj' [E, I, d]}
and return [N, d].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layers import einsum_f32


def swiglu_experts(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dispatch_dense(x, weights, idx, p):
    """Reference path: run every expert on every token, combine with a sparse [N, E] weight matrix.

    E/k times the FLOPs of the sparse paths; used as the ground truth in tests and for tiny E.
    """
    E = p["gate_proj"].shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E]
    h = swiglu_experts(jnp.einsum("nd,edi->nei", x, p["gate_proj"]), jnp.einsum("nd,edi->nei", x, p["up_proj"]))
    out = einsum_f32("nei,eid->ned", h, p["down_proj"])
    return jnp.einsum("ned,ne->nd", out, combine).astype(x.dtype)


def dispatch_gather(x, weights, idx, p):
    """Decode path: gather the k chosen experts' weights per token ([N, k, d, I]); cheap when N is tiny."""
    wg, wu, wd = p["gate_proj"][idx], p["up_proj"][idx], p["down_proj"][idx]
    h = swiglu_experts(jnp.einsum("nd,nkdi->nki", x, wg), jnp.einsum("nd,nkdi->nki", x, wu))
    out = einsum_f32("nki,nkid->nkd", h, wd)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(jnp.float32)).astype(x.dtype)


DISPATCH = {"dense": dispatch_dense, "gather": dispatch_gather}


def dispatch(x, weights, idx, p, method: str = "auto"):
    """Pick a dispatch path. 'auto': gather for a handful of tokens (decode), dense otherwise."""
    if method == "auto":
        method = "gather" if x.shape[0] * idx.shape[1] <= p["gate_proj"].shape[0] else "dense"
    if method not in DISPATCH:
        raise ValueError(f"unknown MoE dispatch {method!r}; choose from auto, {', '.join(DISPATCH)}")
    return DISPATCH[method](x, weights, idx, p)
