"""Prefill and KV-cache decoding (`lax.while_loop`), sampling with an explicit PRNG key.

Layout: every sequence is right-padded; token t of sequence b lives in row t of both the token
buffer `buf [B, S]` and the KV cache, so positions are per-sequence and a batch of prompts of
different lengths behaves exactly like each prompt alone.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .model import get_module, positions_for
from .rewire import sequence_losses


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits, key, s: Sampling):
    """logits [B, V] fp32 -> tokens [B] int32."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        cutoff_idx = jnp.sum(jnp.cumsum(probs, -1) - probs < s.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(order, cutoff_idx[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    buf: Any        # [B, S] int32 context + generated tokens
    lengths: Any    # [B] valid tokens in buf
    logits: Any     # [B, V] next-token logits (for position lengths[b])
    done: Any       # [B] bool: EOS emitted or max_new_tokens reached
    num_new: Any    # [B] tokens generated so far
    key: Any


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "reduction", "dispatch"))
def prefill(params, tokens, lengths, deltas, cfg: ModelConfig, cache_len: int, reduction: Optional[str] = "mean",
            dispatch: str = "auto"):
    """tokens [B, T] right-padded -> (next logits [B, V], cache (list of {'k','v'} [B, S, ...]),
    context loss [B] under these deltas, or None with reduction=None: then the LM head runs on the
    last token of each sequence only)."""
    B, T = tokens.shape
    module, v = get_module(cfg, dispatch), {"params": params}
    x, kv, _ = module.apply(v, module.apply(v, tokens, method="embed"), positions_for(tokens), deltas,
                            method="run_layers")
    pad = lambda a: jnp.zeros((B, cache_len) + a.shape[2:], a.dtype).at[:, :T].set(a)
    cache = jax.tree.map(pad, kv)
    if reduction is None:
        x_last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        return module.apply(v, x_last, method="head")[:, 0], cache, None
    logits = module.apply(v, x, method="head")
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache, sequence_losses(logits, tokens, lengths, reduction)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "window", "dispatch"),
                   donate_argnames=("state", "cache"))
def decode(params, state: DecodeState, cache, deltas, eos_ids, max_new, cfg: ModelConfig,
           sampling: Sampling, max_steps: int, window: Optional[int] = None, dispatch: str = "auto"):
    """Generate up to `max_steps` tokens per sequence (fewer once every sequence is done).

    eos_ids [n_eos] int32 (may be empty); max_new [] int32: per-sequence total budget.
    window: attend over the first `window` cache rows only (static; the caller guarantees that
    every position written in this call is < window): attention and KV traffic scale with the
    context reached, not the cache size. None: the whole cache.
    -> (state, cache). The cache always holds K/V for every token in buf except the last sampled one.
    """
    module = get_module(cfg, dispatch)
    full = cache
    S = cache_rows(cache)
    if window is not None and window < S:
        cache = jax.tree.map(lambda a: a[:, :window], cache)
        S = window

    def cond(carry):
        step, st, _ = carry
        return (step < max_steps) & ~jnp.all(st.done)

    def body(carry):
        step, st, cache = carry
        key, sub = jax.random.split(st.key)
        tok = sample(st.logits, sub, sampling)
        live = ~st.done
        pos = jnp.minimum(st.lengths, S - 1)          # cache row (clamped for finished rows)
        Sb = st.buf.shape[1]
        buf = jnp.where(live[:, None] & (jnp.arange(Sb)[None] == jnp.minimum(st.lengths, Sb - 1)[:, None]),
                        tok[:, None], st.buf)
        num_new = st.num_new + live
        hit_eos = jnp.any(tok[:, None] == eos_ids[None], axis=-1)
        done = st.done | (live & hit_eos) | (num_new >= max_new)
        lengths = st.lengths + live
        # feed the new token (finished rows feed a dummy at a clamped position; ignored)
        logits, cache, _ = module.apply({"params": params}, tok[:, None], pos[:, None], deltas, cache)
        return step + 1, DecodeState(buf, lengths, logits[:, 0], done, num_new, key), cache

    _, state, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), state, cache))
    if cache_rows(full) != S:   # write the window back into the full buffers
        cache = jax.tree.map(lambda f, w: jax.lax.dynamic_update_slice_in_dim(f, w, 0, axis=1), full, cache)
    return state, cache


def cache_rows(cache) -> int:
    return jax.tree.leaves(cache)[0].shape[1]
