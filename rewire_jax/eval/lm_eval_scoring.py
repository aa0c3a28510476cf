"""Teacher-forced scoring for the lm-evaluation-harness backend (pure JAX; no lm_eval import).

    deltas = context_deltas(params, cfg, opts, contexts, batch_size)      # [N, L_moe, E]
    scores = score_sequences(params, cfg, seqs, n_scored, deltas, batch_size)  # [(logprob, is_greedy)]

Both sort their inputs longest first and cut them into batches (`plan_batches`): a batch is
right-padded to the length bucket of its longest row (`bucket_length`: 4 buckets per octave) and
to a row count fixed by that bucket (`rows_for`: batch_size, capped on CPU to ~1k row-tokens per
optimisation batch like the generation queue; padding rows inactive / ignored), so a run compiles
one program per bucket whatever its requests (O(log max_length)). Right padding is
exact for a causal model (no position attends to a later one) and every row has its own deltas
and Adam state, so a row's score does not depend on its neighbours (tests/test_lm_eval.py checks
batched == one at a time).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..generation.grouping import phase_token_cap
from ..model import forward, token_nll, zero_deltas
from ..model.config import ModelConfig
from ..rewire import RewireOptions, bucket_length, run_phase, start_cycle


def _padded(seqs: Sequence[Sequence[int]], rows: Sequence[int], m: int, T: int):
    """Rows `rows` of `seqs` right-padded into tokens [m, T] int32 (padding: token 0) and
    lengths [m] (padding rows: length 1)."""
    tokens = np.zeros((m, T), np.int32)
    lengths = np.ones(m, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(seqs[r])] = seqs[r]
        lengths[i] = len(seqs[r])
    return tokens, lengths


def rows_for(T: int, batch_size: int, max_tokens: Optional[int]) -> int:
    """Rows of a batch at bucket T: batch_size, fewer where rows x T would pass max_tokens (>= 1)."""
    return max(1, min(batch_size, max_tokens // T)) if max_tokens else batch_size


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: Optional[int] = None):
    """Sequence lengths -> [(bucket T, row indices, padded rows m)]: longest first, each batch at the
    bucket of its longest sequence and padded to m = rows_for(T) rows, so the batch shape depends on
    the bucket only (one compiled program per bucket) and similar lengths share a batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, i = [], 0
    while i < len(order):
        T = bucket_length(lengths[order[i]])
        m = rows_for(T, batch_size, max_tokens)
        out.append((T, order[i:i + m], m))
        i += m
    return out


def context_deltas(params, cfg: ModelConfig, opts: RewireOptions, contexts: Sequence[Sequence[int]],
                   batch_size: int) -> np.ndarray:
    """One optimisation phase (`run_phase`: `opts.steps` Adam steps from zero deltas and a fresh
    Adam state) on each context -> deltas [N, L_moe, E] fp32, what the generation cycle's first
    phase gives a prompt (= `Rewirer(cfg, opts).step(params, zeros, context)`). Identical contexts
    are optimised once. A context of fewer than 2 tokens has no next-token target: its deltas stay
    zero (the phase would not move them either)."""
    out = np.zeros((len(contexts), *cfg.delta_shape), np.float32)
    unique: dict[tuple, list[int]] = {}
    for i, c in enumerate(contexts):
        if len(c) >= 2:
            unique.setdefault(tuple(int(t) for t in c), []).append(i)
    keys = list(unique)
    for T, rows, m in plan_batches([len(k) for k in keys], batch_size, phase_token_cap()):
        tokens, lengths = _padded(keys, rows, m, T)
        state = start_cycle(cfg, opts, m)
        state, _ = run_phase(params, state, tokens, lengths, cfg, opts, np.arange(m) < len(rows))
        deltas = np.asarray(state.deltas)
        for i, r in enumerate(rows):
            out[unique[keys[r]]] = deltas[i]
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(params, tokens, deltas, cfg: ModelConfig):
    """tokens [B, T], deltas [B, L_moe, E] -> (log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1] fp32,
    whether tokens[:, t+1] is the argmax there [B, T-1] bool)."""
    logits = forward(params, tokens, deltas, cfg)[0]
    greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return -token_nll(logits, tokens), greedy


def score_sequences(params, cfg: ModelConfig, seqs: Sequence[Sequence[int]], n_scored: Sequence[int],
                    deltas: Optional[np.ndarray], batch_size: int) -> list[tuple[float, bool]]:
    """Sum of the log-probs of the last n_scored[i] tokens of seqs[i] given the tokens before them,
    and whether each of those tokens is the greedy (argmax) choice -> [(logprob, is_greedy)].
    deltas: None (zeros) or [N, L_moe, E], one per sequence. Needs 1 <= n_scored[i] < len(seqs[i])."""
    for s, n in zip(seqs, n_scored):
        if not 1 <= n < len(s):
            raise ValueError(f"cannot score the last {n} of {len(s)} tokens: a scored span needs at least one "
                             f"token and at least one token before it")
    out: list = [None] * len(seqs)
    for T, rows, m in plan_batches([len(s) for s in seqs], batch_size):
        tokens, lengths = _padded(seqs, rows, m, T)
        d = zero_deltas(cfg, m) if deltas is None else jnp.asarray(
            np.concatenate([deltas[rows], np.zeros((m - len(rows), *cfg.delta_shape), np.float32)]))
        lp, greedy = (np.asarray(a) for a in token_logprobs(params, jnp.asarray(tokens), d, cfg))
        for i, r in enumerate(rows):
            n, L = n_scored[r], lengths[i]
            span = slice(L - 1 - n, L - 1)      # position t scores token t+1
            out[r] = (float(lp[i, span].sum(dtype=np.float64)), bool(greedy[i, span].all()))
    return out
