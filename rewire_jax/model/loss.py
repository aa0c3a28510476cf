"""Next-token cross-entropy: the one loss of the library (the rewiring's objective, prefill's
context loss, the held-out NLL experiment and the demo model's training)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets):
    """logits [B, T, V] fp32, targets [B, T] int -> per-position cross-entropy [B, T]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    # the target logit as a masked sum, not take_along_axis: its gradient is elementwise
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    return lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def token_nll(logits, tokens):
    """Per-position next-token NLL. logits [B, T, V] fp32; tokens [B, T] -> [B, T-1] (position t
    scores tokens[:, t+1])."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:])


def sequence_losses(logits, tokens, lengths, reduction: str = "mean"):
    """Next-token CE per sequence over its valid tokens. logits [B, T, V] fp32; tokens [B, T];
    lengths [B] -> [B] (mean over the lengths-1 targets, or their sum)."""
    nll = token_nll(logits, tokens)
    valid = jnp.arange(tokens.shape[1] - 1)[None] < (lengths[:, None] - 1)
    total = jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)
    if reduction == "sum":
        return total
    return total / jnp.maximum(lengths - 1, 1)


def span_nll(logits, tokens, start, stop):
    """Mean NLL per sequence of the targets tokens[:, start:stop] (teacher-forced). -> [B]"""
    nll = token_nll(logits, tokens)
    t = jnp.arange(1, tokens.shape[1])
    mask = (t >= start) & (t < stop)
    return jnp.sum(jnp.where(mask, nll, 0.0), -1) / jnp.sum(mask)
