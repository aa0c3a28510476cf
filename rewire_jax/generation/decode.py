"""Prefill and KV-cache decoding in chunks (`run_decode`, `DecodeChunks`), sampling with an explicit PRNG key.

Layout: every sequence is right-padded; token t of sequence b lives in row t of both the token
buffer `buf [B, S]` and the KV cache (`cache[stack][sub][name]` [repeats, B, S, ...], see
rewire_jax.model.transformer), so positions are per-sequence and a batch of prompts of different
lengths behaves exactly like each prompt alone.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


@dataclasses.dataclass(frozen=True)
class DecodeChunks:
    """How `run_decode` cuts a decode call into device calls (chunks) of at most `steps` tokens.

    masked=True: each chunk is a loop with a static trip count; a step after the chunk's stop
    condition (every row done, or its steps used) changes nothing. The loop never reads a device
    value to decide whether to go on, so on a GPU it does not copy a predicate to the host and wait
    at every token (a data-dependent `lax.while_loop` does); the host looks at the done flags once
    per chunk. masked=False: a `lax.while_loop` that stops as soon as the condition holds: free on
    CPU, where the device is the host, and it wastes no steps."""

    steps: int = 32
    masked: bool = True

    def __post_init__(self):
        if int(self.steps) < 1:
            raise ValueError(f"DecodeChunks.steps must be >= 1, got {self.steps}")

    def trip(self, max_steps: int) -> int:
        """Steps per chunk for a call of `max_steps`: at most `steps`, spread evenly over the fewest
        chunks (a 100-step call with steps=32 runs 4 chunks of 25, not 3 of 32 and one of 4 with
        28 masked steps). A function of static values: one program per call shape."""
        n = -(-max_steps // self.steps)
        return -(-max_steps // n)


def default_chunks(backend: Optional[str] = None) -> DecodeChunks:
    """The chunking for a backend (default: JAX's default backend): 32 masked steps per device call
    on GPU/TPU; on CPU a while_loop that exits early, 128 steps per call (measured no slower than
    shorter chunks or the masked loop on CPU: docs/performance.md)."""
    backend = backend or jax.default_backend()
    return DecodeChunks(128, masked=False) if backend == "cpu" else DecodeChunks(32, masked=True)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_steps", "window", "dispatch", "stop_on_any",
                                             "masked"),
                   donate_argnames=("state", "cache"))
def decode(params, state: DecodeState, cache, deltas, eos_ids, max_new, cfg: ModelConfig,
           sampling: Sampling, max_steps: int, window: Optional[int] = None, dispatch: Optional[str] = None,
           stop_on_any: bool = False, route=None, min_done=1, steps=None, masked: bool = False):
    """One device call (a chunk): up to `max_steps` tokens per sequence (fewer once every sequence
    is done). Callers go through `run_decode`, which cuts a longer call into chunks.

    eos_ids [n_eos] int32 (may be empty); max_new [] or [B] int32: per-sequence total budget.
    steps: None (= max_steps) or a traced int <= max_steps: the steps this call may take (the last
    chunk of a call; no recompilation per count).
    masked (static): run exactly `max_steps` loop iterations, those past the stop condition changing
    nothing (no per-token host wait on GPU: see `DecodeChunks`); else a while_loop that exits.
    stop_on_any (while_loop only): return as soon as `min_done` (traced int, default 1) of the
    sequences that were live on entry are done; with masked=True `run_decode` checks that between
    chunks (the rows still live decode on to the chunk's end).
    window: attend over the first `window` cache rows only (static; the caller guarantees that
    every position written in this call is < window, with masked=True also each row's position
    after its last step: `decode_window`): attention and KV traffic scale with the context
    reached, not the cache size. None: the whole cache.
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
    limit = max_steps if steps is None else steps
    done0 = state.done

    def go_on(step, st):
        go = (step < limit) & ~jnp.all(st.done)
        if stop_on_any and not masked:   # return once `min_done` of the rows live on entry are done
            go &= jnp.sum(st.done & ~done0) < min_done
        return go

    def body(step, st, cache, go):
        """One token for the live rows; go=False: a step that changes nothing but cache rows no
        one reads (each row's next position, which its next real step overwrites)."""
        live = ~st.done & go
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
        done = st.done | (live & hit_eos) | (go & (num_new >= max_new))
        lengths = st.lengths + live
        # feed the new token (finished rows feed a dummy at a clamped position; ignored)
        positions = pos[:, None]
        x, cache, _ = run_layers(params, embed(params, tok[:, None], cfg), positions, deltas, cfg, cache=cache,
                                 dispatch=dispatch, route=route)
        # rows that were done keep their logits (a row the queue resumes needs its own, not the dummy's)
        logits = jnp.where(live[:, None], head(params, x, cfg)[:, 0], st.logits)
        key = jnp.where(go, key, st.key)   # a skipped step draws nothing: the key stream is the while_loop's
        return DecodeState(buf, lengths, logits, done, num_new, key), cache

    if masked:
        def step_fn(step, carry):
            st, cache = carry
            return body(step, st, cache, go_on(step, st))
        state, cache = jax.lax.fori_loop(0, max_steps, step_fn, (state, cache))
    else:
        def while_body(carry):
            step, st, cache = carry
            return (step + 1,) + body(step, st, cache, jnp.bool_(True))
        _, state, cache = jax.lax.while_loop(lambda c: go_on(c[0], c[1]), while_body, (jnp.int32(0), state, cache))
    cache = join_cache(cache, windowed)
    if cache_rows(full) != S:   # write the window back into the full buffers
        cache = jax.tree.map(lambda f, w: jax.lax.dynamic_update_slice_in_dim(f, w, 0, axis=2), full, cache)
    return state, cache


def run_decode(params, state: DecodeState, cache, deltas, eos_ids, max_new, cfg: ModelConfig, sampling: Sampling,
               max_steps: int, window: Optional[int] = None, dispatch: Optional[str] = None,
               stop_on_any: bool = False, route=None, min_done: int = 1,
               chunks: Optional[DecodeChunks] = None):
    """Up to `max_steps` tokens per sequence as `decode` computes them, in device calls of at most
    `chunks.steps` tokens (default `default_chunks()`); the host reads the done flags between
    chunks only. The same tokens and key stream as one `decode` call of max_steps, except that
    with masked chunks stop_on_any returns at the first chunk boundary where `min_done` rows of
    those live on entry are done (the others decoded on meanwhile; greedy tokens do not change).
    Arguments as `decode`; min_done a host int. -> (state, cache)."""
    chunks = chunks or default_chunks()   # the caller's window must be decode_window(..., chunks.masked)
    trip = chunks.trip(max_steps)
    done = done0 = np.array(state.done)   # a host copy: state is donated below
    left = max_steps
    while True:   # in-chunk: rows live on the chunk's entry; the ones done in earlier chunks count
        need = max(1, min_done - int((done & ~done0).sum())) if stop_on_any else 1
        state, cache = decode(params, state, cache, deltas, eos_ids, max_new, cfg, sampling, trip, window, dispatch,
                              stop_on_any, route, jnp.int32(need), jnp.int32(min(trip, left)), chunks.masked)
        left -= trip
        if left <= 0:
            return state, cache
        done = np.array(state.done)   # the host's one look per chunk
        if done.all() or (stop_on_any and (done & ~done0).sum() >= min_done):
            return state, cache


def decode_window(reach: int, cache_len: int, masked: bool = False) -> Optional[int]:
    """The `window` for a decode call whose rows reach position `reach`: its length bucket, or None
    (the whole cache) when that bucket covers the cache: one compiled program, not one per bucket
    past the cache length (a window >= the cache rows is the whole cache either way).
    masked (masked chunks, `DecodeChunks`): room for one more row, `reach` itself: a skipped step
    writes a dummy K/V row at each row's next position, which must not be clamped onto the last
    real one (inside the window; at the cache's end only finished sequences lie)."""
    w = bucket_length(reach + masked, cap=cache_len)
    return None if w >= cache_len else w


def cache_rows(cache) -> int:
    return jax.tree.leaves(cache)[0].shape[2]
