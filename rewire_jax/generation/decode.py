"""Prefill and KV-cache decoding (`lax.while_loop`), sampling with an explicit PRNG key.

Layout: every sequence is right-padded; token t of sequence b lives in row t of both the token
buffer `buf [B, S]` and the KV cache (`cache[stack][sub][name]` [repeats, B, S, ...], see
rewire_jax.model.transformer), so positions are per-sequence and a batch of prompts of different
lengths behaves exactly like each prompt alone.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..model import embed, head, positions_for, run_layers, sequence_losses
from ..model.transformer import join_cache, split_cache, split_layers
from ..model.config import ModelConfig
from ..rewire.cycle import bucket_length
from .sampling import Sampling, sample


class DecodeState(NamedTuple):
    buf: Any        # [B, S] int32 context + generated tokens
    lengths: Any    # [B] valid tokens in buf
    logits: Any     # [B, V] next-token logits (for position lengths[b])
    done: Any       # [B] bool: EOS emitted or max_new_tokens reached
    num_new: Any    # [B] tokens generated so far
    key: Any        # one PRNG key for the batch, or one per row [B] (each row draws from its own)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "reduction", "dispatch"))
def prefill(params, tokens, lengths, deltas, cfg: ModelConfig, cache_len: int, reduction: Optional[str] = "mean",
            dispatch: Optional[str] = None, route=None):
    """tokens [B, T] right-padded -> (next logits [B, V], cache ([repeats, B, cache_len, ...] leaves),
    context loss [B] under these deltas, or None with reduction=None: then the LM head runs on the
    last token of each sequence only). route: None or a routing override (model.moe.RouteOverride,
    [B, ...] arrays)."""
    B, T = tokens.shape
    x, rows, _ = run_layers(params, embed(params, tokens, cfg), positions_for(tokens), deltas, cfg, dispatch=dispatch,
                            route=route)
    pad = lambda a: jnp.zeros(a.shape[:2] + (cache_len,) + a.shape[3:], a.dtype).at[:, :, :T].set(a)
    cache = jax.tree.map(pad, rows)
    if reduction is None:
        x_last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        return head(params, x_last, cfg)[:, 0], cache, None
    logits = head(params, x, cfg)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache, sequence_losses(logits, tokens, lengths, reduction)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "window", "dispatch", "stop_on_any"),
                   donate_argnames=("state", "cache"))
def decode(params, state: DecodeState, cache, deltas, eos_ids, max_new, cfg: ModelConfig,
           sampling: Sampling, max_steps: int, window: Optional[int] = None, dispatch: Optional[str] = None,
           stop_on_any: bool = False, route=None, min_done=1):
    """Generate up to `max_steps` tokens per sequence (fewer once every sequence is done).

    eos_ids [n_eos] int32 (may be empty); max_new [] or [B] int32: per-sequence total budget.
    stop_on_any: return as soon as `min_done` (traced int, default 1) of the sequences that were live
    on entry are done (the queue refills or re-optimises those rows while the others wait only for
    that).
    window: attend over the first `window` cache rows only (static; the caller guarantees that
    every position written in this call is < window): attention and KV traffic scale with the
    context reached, not the cache size. None: the whole cache.
    route: None or a routing override (model.moe.RouteOverride, [B, ...] arrays); it acts on every
    token fed whose position is >= its start (a generated token's position: its row in buf).
    -> (state, cache). The cache always holds K/V for every token in buf except the last sampled one.
    """
    full = cache
    S = cache_rows(cache)
    if window is not None and window < S:
        cache = jax.tree.map(lambda a: a[:, :, :window], cache)
        S = window
    # unrolled stacks: separate per-layer weights and cache buffers for the whole loop (one copy here,
    # not one per token)
    windowed = cache
    params, cache = split_layers(params, cfg), split_cache(cache, cfg)

    done0 = state.done

    def cond(carry):
        step, st, _ = carry
        go = (step < max_steps) & ~jnp.all(st.done)
        if stop_on_any:   # return once `min_done` of the rows live on entry are done (traced: no recompile)
            go &= jnp.sum(st.done & ~done0) < min_done
        return go

    def body(carry):
        step, st, cache = carry
        live = ~st.done
        if st.key.ndim:   # one key per row [B], advanced only while the row is live: its own stream (seed)
            ks = jax.vmap(jax.random.split)(st.key)
            key, sub = jnp.where(live, ks[:, 0], st.key), ks[:, 1]
        else:
            key, sub = jax.random.split(st.key)
        tok = sample(st.logits, sub, sampling)
        pos = jnp.minimum(st.lengths, S - 1)          # cache row (clamped for finished rows)
        Sb = st.buf.shape[1]
        buf = jnp.where(live[:, None] & (jnp.arange(Sb)[None] == jnp.minimum(st.lengths, Sb - 1)[:, None]),
                        tok[:, None], st.buf)
        num_new = st.num_new + live
        hit_eos = jnp.any(tok[:, None] == eos_ids[None], axis=-1)
        done = st.done | (live & hit_eos) | (num_new >= max_new)
        lengths = st.lengths + live
        # feed the new token (finished rows feed a dummy at a clamped position; ignored)
        positions = pos[:, None]
        x, cache, _ = run_layers(params, embed(params, tok[:, None], cfg), positions, deltas, cfg, cache=cache,
                                 dispatch=dispatch, route=route)
        # rows that were done keep their logits (a row the queue resumes needs its own, not the dummy's)
        logits = jnp.where(live[:, None], head(params, x, cfg)[:, 0], st.logits)
        return step + 1, DecodeState(buf, lengths, logits, done, num_new, key), cache

    _, state, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), state, cache))
    cache = join_cache(cache, windowed)
    if cache_rows(full) != S:   # write the window back into the full buffers
        cache = jax.tree.map(lambda f, w: jax.lax.dynamic_update_slice_in_dim(f, w, 0, axis=2), full, cache)
    return state, cache


def decode_window(reach: int, cache_len: int) -> Optional[int]:
    """The `window` for a decode call whose rows reach position `reach`: its length bucket, or None
    (the whole cache) when that bucket covers the cache: one compiled program, not one per bucket
    past the cache length (a window >= the cache rows is the whole cache either way)."""
    w = bucket_length(reach, cap=cache_len)
    return None if w >= cache_len else w


def cache_rows(cache) -> int:
    return jax.tree.leaves(cache)[0].shape[2]
