"""Rows of a batch grouped by context length for the optimisation phase: a short context does not
pay for the longest. Used by `generate` (lock-step batches) and `generate_queue` (refilled rows).

Shapes: B = batch rows, S = cache length, m = padded sub-batch rows, T_b = a context bucket.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..rewire import CycleState, RewireOptions, bucket_length, run_phase
from ..rewire.options import PhaseOutput


def _pow2(n: int, cap: int) -> int:
    """Sub-batch rows for n rows: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (two sizes per power
    of two: at most a third of a sub-batch is padding, and O(log B) sizes compile), capped at cap."""
    m = 1
    while m < n:
        m = m + 1 if m < 2 else (m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3)
    return min(cap, m)


#: a sub-batch's fixed cost in row-tokens (one more call: dispatch, host sync, the first step's
#: launch); measured order of magnitude on CPU, only used to decide whether to merge groups
CALL_COST_TOKENS = 256


#: CPU: at most this many (padded) row-tokens per optimisation sub-batch. Measured on the demo model
#: (2-core CPU, paper defaults): a phase costs 42 ms/row at 4-8 rows x 128 tokens and 98 ms/row at
#: 4 x 256, but 60 / 145 ms/row at 16 x 128 / 8-16 x 256 (activations leave the caches): past ~1k
#: row-tokens a bigger batch is slower per row. Accelerators: no cap (a batch fills the device).
PHASE_TOKENS_CPU = 1024


def phase_token_cap() -> Optional[int]:
    return PHASE_TOKENS_CPU if jax.default_backend() == "cpu" else None


def plan_groups(rows_buckets, cap: int, max_tokens: Optional[int] = None):
    """Rows at context buckets -> groups [(bucket, rows)], each run as one sub-batch at its bucket.

    Rows are sorted by bucket and cut into contiguous runs, each padded to `_pow2` rows and run at
    its largest bucket; the cut minimises sum(padded rows x bucket) + CALL_COST_TOKENS per group (a
    small dynamic programme), so a short context does not pay for a long one unless a separate call
    costs more than the padding it saves. max_tokens: no group above that many padded row-tokens
    (unless it is a single row)."""
    items = sorted(rows_buckets, key=lambda rb: (rb[1], rb[0]))
    n = len(items)
    if n == 0:
        return []
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + _pow2(j - i, cap) * items[j - 1][1] + CALL_COST_TOKENS
            if j - i > cap or (max_tokens and j - i > 1 and _pow2(j - i, cap) * items[j - 1][1] > max_tokens):
                continue
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        groups.append((items[j - 1][1], [r for r, _ in items[i:j]]))
        j = i
    return groups[::-1]


def phase_grouped(params, cycle: CycleState, buf, lengths, active, cap: int, cfg, opts: RewireOptions,
                  dispatch=None):
    """One optimisation phase of a lock-step batch with its rows grouped by context bucket
    (`plan_groups`): each group runs `run_phase` on its own sub-batch at its own bucket.
    buf [B, S] (device or host), lengths [B] and active [B] (host). -> (CycleState, PhaseOutput)."""
    B = len(lengths)
    rows = [(int(r), bucket_length(int(lengths[r]), cap=cap)) for r in np.flatnonzero(active)]
    groups = plan_groups(rows, B, phase_token_cap())
    if len(groups) <= 1:
        Tb = bucket_length(int(np.max(lengths)), cap=cap)
        return run_phase(params, cycle, buf[:, :Tb], jnp.asarray(lengths), cfg, opts, jnp.asarray(active), dispatch)
    d_all, opt_all = cycle.deltas, cycle.opt_state
    loss, scores, weights = np.zeros(B, np.float32), np.zeros((B, cfg.num_moe_layers), np.float32), \
        np.zeros((B, cfg.num_moe_layers), np.float32)
    buf = jnp.asarray(buf)
    for Tb, g in groups:
        m = _pow2(len(g), B)
        gather_idx, put_idx = _padded_rows(g, B, m)
        gi, pi = jnp.asarray(gather_idx), jnp.asarray(put_idx)
        sub = CycleState(_take(d_all, gi), _take(opt_all, gi), cycle.phase_index)
        sub, out = run_phase(params, sub, _take(buf, gi)[:, :Tb], jnp.asarray(np.asarray(lengths)[gather_idx]), cfg,
                             opts, jnp.asarray(np.arange(m) < len(g)), dispatch)
        d_all, opt_all = _put(d_all, sub.deltas, pi), _put(opt_all, sub.opt_state, pi)
        loss[g], scores[g], weights[g] = (np.asarray(a)[:len(g)] for a in (out.loss, out.scores, out.weights))
    state = CycleState(d_all, opt_all, cycle.phase_index + 1)
    return state, PhaseOutput(d_all, opt_all, loss, scores, weights)


@functools.partial(jax.jit, static_argnames=("axis",))
def _take(tree, idx, axis: int = 0):
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=axis, mode="clip"), tree)


@functools.partial(jax.jit, static_argnames=("axis",), donate_argnames=("full",))
def _put(full, sub, idx, axis: int = 0):
    """full[idx] = sub along `axis`; indices out of range (padding rows) are dropped."""
    def one(f, s):
        f = jnp.moveaxis(f, axis, 0)
        f = f.at[idx].set(jnp.moveaxis(s, axis, 0).astype(f.dtype), mode="drop")
        return jnp.moveaxis(f, 0, axis)
    return jax.tree.map(one, full, sub)


def _padded_rows(rows, B: int, m: int):
    """rows (len <= m) -> (gather indices [m]: padding repeats the first row, put indices [m]:
    padding is B, out of range, dropped by `_put`)."""
    rows = list(rows)
    pad = m - len(rows)
    return (np.array(rows + [rows[0]] * pad, np.int32), np.array(rows + [B] * pad, np.int32))
