"""A generation queue that keeps a fixed batch full: any number of prompts, `batch_size` rows.

    out = rewire_jax.generate_queue(model, prompts, max_new_tokens=[256, 64, ...], batch_size=16,
                                    rewire=RewireOptions(), stops=[["\\ndef "], [], ...])
    out.tokens[i], out.texts[i], out.deltas[i], out.phases[i], out.stopped[i], out.stats

Each row holds one sequence at a time. When a sequence ends (EOS, a stop string, its own
max_new_tokens) its row takes the next prompt with fresh deltas (zeros, or `deltas`) and a fresh
Adam state, and runs its own phase schedule from its own context length: a phase on the prompt,
then one every `interval` tokens it generates (`RewireOptions.wants_phase`), each followed by a
prefill of that row's context with its new deltas. Greedy tokens and deltas of every sequence are
what `generate` gives it alone (tests/test_queue.py), whatever its neighbours.

How a step of the queue runs (shapes static: no recompilation per refill):
  1. rows waiting for a phase (a new prompt, or `interval` tokens since the last phase) are grouped
     by context-length bucket (`bucket_length`) and each group runs ONE optimisation phase on a
     sub-batch padded to a power of two rows (padding rows inactive), so a short context never
     pays for a long one; then the group is prefilled with its new deltas and its cache rows,
     logits, deltas and Adam state are written back into the batch (`.at[rows].set`, in place);
  2. one `decode` call over the whole batch, each row with its own budget (up to its next phase
     boundary, its own max_new_tokens, or the next stop-string check), returning as soon as
     `refill_group` rows (default a quarter of the batch) have finished or reached a phase
     (`decode(..., stop_on_any=True, min_done=...)`);
  3. finished rows are collected and refilled.
Compiled programs: per context bucket one phase and one prefill per power-of-two sub-batch size,
one decode per attention window bucket, and a few tiny gathers / scatters.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..api import Model, check_token_ids
from ..model.transformer import batched_route, prepare_params
from ..rewire import CycleState, RewireOptions, bucket_length, run_phase
from ..rewire.selection import init_opt_state
from ..model import batched_deltas
from .decode import DecodeState, decode, decode_window, prefill
from .generate import DECODE_CHUNK, _prompts_to_ids
from .grouping import _padded_rows, _pow2, _put, _take, phase_token_cap, plan_groups
from .sampling import Sampling

#: with stop strings, a row's decode budget reaches at most this many tokens past its last check
STOP_CHECK = 32


@dataclasses.dataclass
class QueueResult:
    """What `generate_queue` returns, per prompt in prompt order: new tokens (texts), final deltas
    [L_moe, E], phase history, whether a stop string ended it; plus timing and batch statistics
    (`stats["idle_fraction"]`: decode row-steps spent on rows with nothing to do)."""

    tokens: list[list[int]]       # new tokens per prompt, in prompt order (cut after a stop string)
    deltas: list[np.ndarray]      # [L_moe, E] final deltas per prompt
    phases: list[list[dict]]      # per prompt: {context_len, loss_before, loss_after, scores, weights}
    stopped: list[bool]           # a stop string ended the sequence
    timing: dict[str, float]      # seconds: optimise, prefill, decode, total
    stats: dict[str, Any]         # decode row-steps busy / total, phases and sub-batch sizes, refills
    texts: Optional[list[str]] = None
    opt_states: Optional[list] = None   # final Adam state per prompt ([1, ...] leaves, host arrays)


def _as_list(x, n: int, name: str):
    if x is None or isinstance(x, (int, np.integer)):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{name}: {len(x)} values for {n} prompts")
    return x


def _find_stop(text: str, stops: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def generate_queue(model: Model, prompts, max_new_tokens=128, *, batch_size: int = 16,
                   rewire: Optional[RewireOptions] = None, sampling: Sampling = Sampling(), seed: int = 0,
                   deltas=None, eos_token_id: Any = "config", stops=None, cache_len: Optional[int] = None,
                   dispatch: Optional[str] = None, on_finish=None, route=None,
                   refill_group: Optional[int] = None, opt_state=None) -> QueueResult:
    """Generate for any number of prompts through a batch of `batch_size` rows kept full.

    prompts: strings or token-id lists. max_new_tokens: an int or one per prompt. stops: None, a
    list of stop strings for all prompts, or one list per prompt (needs the model's tokenizer): a
    sequence ends at the token that completes a stop string (its tokens are cut after that token,
    its text before the stop string). deltas: initial deltas [L_moe, E] for every sequence (default
    zeros), or [n, L_moe, E], one per prompt. opt_state: None (a fresh Adam state per sequence) or
    one per prompt ([n, ...] leaves as `init_opt_state` lays them out): with per-prompt deltas, each
    sequence continues its own cycle (conversations, `rewire_jax.reply_many`). on_finish(prompt_index, tokens) is called as each sequence ends. route: None, or a
    routing override (`rewire_jax.model.moe.RouteOverride`) with one row per prompt ([n, ...] arrays,
    or unbatched for all): a row takes its prompt's override with the prompt (C3PO; not combined
    with rewiring).
    Sampling (temperature > 0) draws from one key stream per queue run: seeded, but a sequence's
    samples depend on its neighbours; greedy decoding does not.
    refill_group: a decode call returns once this many rows have ended or reached a phase (default
    batch_size // 4, at least 1; capped by the rows still live): ended rows wait a little, and the
    queue makes that many times fewer host round trips and refill prefills. 1 = refill at once.
    A row's own tokens and deltas do not depend on it (greedy).
    """
    cfg = model.config
    t_start = time.perf_counter()
    ids = _prompts_to_ids(model, prompts)
    n = len(ids)
    check_token_ids(np.concatenate([np.asarray(p) for p in ids]), cfg.vocab_size)
    budgets = [int(b) for b in _as_list(max_new_tokens, n, "max_new_tokens")]
    if min(budgets) < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if stops is None or (len(stops) > 0 and isinstance(stops[0], str)) or len(stops) == 0:
        stops = [tuple(stops or ())] * n
    stops = [tuple(s) for s in _as_list(stops, n, "stops")]
    if any(stops) and model.tokenizer is None:
        raise ValueError("stop strings need the model's tokenizer")
    opts = rewire if (rewire is not None and rewire.enabled) else None
    if route is not None and opts is not None:
        raise ValueError("a routing override (route=) and rewiring (rewire=) cannot be combined")
    route_np = None if route is None else \
        type(route)(*(np.asarray(a) for a in batched_route(route, n, cfg)))   # per prompt, on the host
    B = max(1, min(int(batch_size), n))
    group = max(1, B // 4) if refill_group is None else int(refill_group)
    if group < 1:
        raise ValueError(f"refill_group must be >= 1, got {refill_group}")
    needed = max(len(p) + b for p, b in zip(ids, budgets))
    S = bucket_length(needed) if cache_len is None else cache_len
    if needed > S:
        raise ValueError(f"a prompt + its max_new_tokens ({needed}) does not fit in cache_len={S}")
    eos = cfg.eos_token_ids if eos_token_id == "config" else (
        () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist()))
    eos_set = set(int(e) for e in eos)
    eos_arr = jnp.asarray(np.array(eos, np.int32).reshape(-1))
    step_cap = opts.interval if (opts and opts.continuous) else DECODE_CHUNK
    if any(stops):
        step_cap = min(step_cap, STOP_CHECK)
    o = opts or RewireOptions()
    per_prompt = deltas is not None and np.ndim(deltas) == 3
    d0 = batched_deltas(deltas[0] if per_prompt else deltas, 1, cfg)[0]
    d_init = np.asarray(batched_deltas(deltas, n, cfg)) if per_prompt else None
    if opt_state is not None:
        from ..rewire.cycle import checked_opt_state
        opt_init = jax.tree.map(np.asarray, checked_opt_state(opt_state, init_opt_state(o, jnp.zeros((n, *cfg.delta_shape)))))

    params = prepare_params(model.params, cfg)
    buf = np.zeros((B, S), np.int32)
    lengths = np.ones(B, np.int32)
    num_new = np.zeros(B, np.int32)
    row_prompt = np.full(B, -1)                 # prompt index held by each row (-1: empty)
    row_phases = np.zeros(B, np.int64)          # phases run for the row's sequence
    row_checked = np.zeros(B, np.int64)         # new tokens already searched for stop strings
    d_all = jnp.broadcast_to(d0, (B, *cfg.delta_shape)) + 0.0
    opt_all = init_opt_state(o, d_all)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    cache = None
    key = jax.random.key(seed)
    fresh_one = init_opt_state(o, d0[None])
    route_all = None   # per row: its prompt's override (empty rows: alpha 1, the model's own routing)
    if route_np is not None:
        route_all = type(route_np)(jnp.zeros((B, *cfg.delta_shape), jnp.float32),
                                   jnp.ones((B, cfg.num_moe_layers), jnp.float32), jnp.zeros(B, jnp.int32))

    out_tokens: list = [None] * n
    out_deltas: list = [None] * n
    out_phases: list = [[] for _ in range(n)]
    out_stopped = [False] * n
    out_opt: list = [None] * n
    timing = {"optimise": 0.0, "prefill": 0.0, "decode": 0.0}
    stats = {"decode_calls": 0, "row_steps_busy": 0, "row_steps_total": 0, "phase_calls": 0,
             "phase_rows": 0, "phase_rows_padded": 0, "prefill_calls": 0, "refills": 0}
    next_prompt = 0
    pending = set()          # rows whose sequence needs a phase / prefill before decoding on

    def refill(rows):
        nonlocal next_prompt, d_all, opt_all, route_all
        filled = []
        for r in rows:
            if next_prompt >= n:
                row_prompt[r] = -1
                continue
            p = ids[next_prompt]
            buf[r] = 0
            buf[r, :len(p)] = p
            lengths[r], num_new[r] = len(p), 0
            row_prompt[r], row_phases[r], row_checked[r] = next_prompt, 0, 0
            next_prompt += 1
            filled.append(r)
            pending.add(r)
        if filled:
            stats["refills"] += len(filled)
            idx = jnp.asarray(_padded_rows(filled, B, _pow2(len(filled), B))[1])
            m = len(idx)
            which = [int(row_prompt[r]) for r in filled]
            which += [which[0]] * (m - len(which))
            if d_init is None:
                d_all = _put(d_all, jnp.broadcast_to(d0, (m, *cfg.delta_shape)) + 0.0, idx)
            else:
                d_all = _put(d_all, jnp.asarray(d_init[which]), idx)
            if opt_state is None:
                opt_all = _put(opt_all, jax.tree.map(lambda a: jnp.broadcast_to(a, (m,) + a.shape[1:]), fresh_one), idx)
            else:
                opt_all = _put(opt_all, jax.tree.map(lambda a: jnp.asarray(a[which]), opt_init), idx)
            if route_all is not None:
                route_all = _put(route_all, type(route_np)(*(jnp.asarray(a[which]) for a in route_np)), idx)

    def run_pending():
        nonlocal d_all, opt_all, logits, cache
        classes: dict = {}
        for r in sorted(pending):
            wants = opts is not None and opts.wants_phase(int(row_phases[r]))
            k = (wants, int(row_phases[r]) if (wants and opts.selection == "random") else 0)
            classes.setdefault(k, []).append((r, bucket_length(int(lengths[r]), cap=S)))
        groups = [(Tb, wants, pidx, rows) for (wants, pidx), rb in sorted(classes.items())
                  for Tb, rows in plan_groups(rb, B, phase_token_cap() if wants else None)]
        for Tb, wants, pidx, rows in groups:
            m = _pow2(len(rows), B)
            gather_idx, put_idx = _padded_rows(rows, B, m)
            gi, pi = jnp.asarray(gather_idx), jnp.asarray(put_idx)
            real = np.arange(m) < len(rows)
            ctx = jnp.asarray(buf[gather_idx, :Tb])
            lens = jnp.asarray(lengths[gather_idx])
            d_sub = _take(d_all, gi)
            record = None
            if wants:
                t0 = time.perf_counter()
                state = CycleState(d_sub, _take(opt_all, gi), pidx)
                state, res = run_phase(params, state, ctx, lens, cfg, opts, jnp.asarray(real), dispatch)
                d_sub = state.deltas
                jax.block_until_ready(d_sub)
                timing["optimise"] += time.perf_counter() - t0
                opt_all = _put(opt_all, state.opt_state, pi)
                d_all = _put(d_all, d_sub, pi)
                record = (np.asarray(res.loss), np.asarray(res.scores), np.asarray(res.weights))
                stats["phase_calls"] += 1
                stats["phase_rows"] += len(rows)
                stats["phase_rows_padded"] += m
            t0 = time.perf_counter()
            r_sub = None if route_all is None else _take(route_all, gi)
            lg, c_sub, loss_after = prefill(params, ctx, lens, d_sub, cfg, S, opts.loss if opts else None, dispatch,
                                            r_sub)
            logits = _put(logits, lg, pi)
            cache = jax.tree.map(lambda a: jnp.zeros(a.shape[:1] + (B,) + a.shape[2:], a.dtype), c_sub) \
                if cache is None else cache
            cache = _put(cache, c_sub, pi, axis=1)
            jax.block_until_ready(logits)
            timing["prefill"] += time.perf_counter() - t0
            stats["prefill_calls"] += 1
            if record is not None:
                la = np.asarray(loss_after)
                for j, r in enumerate(rows):
                    out_phases[row_prompt[r]].append({
                        "context_len": int(lengths[r]), "loss_before": float(record[0][j]),
                        "loss_after": float(la[j]), "scores": record[1][j].tolist(),
                        "weights": record[2][j].tolist()})
                    row_phases[r] += 1
        pending.clear()

    def finish(r, cut: Optional[int] = None, stopped: bool = False):
        i = int(row_prompt[r])
        toks = buf[r, lengths[r] - num_new[r]:lengths[r]].tolist()
        out_tokens[i] = toks if cut is None else toks[:cut]
        out_deltas[i] = np.asarray(d_all[r])
        out_opt[i] = jax.tree.map(lambda a: np.asarray(a[r:r + 1]), opt_all)
        out_stopped[i] = stopped
        if on_finish:
            on_finish(i, out_tokens[i])

    refill(range(B))
    while True:
        run_pending()
        live = row_prompt >= 0
        if not live.any():
            break
        # each row's budget for this call: its own max, its next phase boundary, its next stop check
        stop_at = np.zeros(B, np.int32)
        for r in np.flatnonzero(live):
            i = int(row_prompt[r])
            b = budgets[i]
            if opts is not None and opts.wants_phase(int(row_phases[r])):
                b = min(b, int(row_phases[r]) * opts.interval)
            if stops[i]:
                b = min(b, int(num_new[r]) + STOP_CHECK)
            stop_at[r] = b
        steps_left = int((stop_at - num_new)[live].max())
        window = decode_window(int(lengths[live].max()) + min(step_cap, steps_left), S)
        state = DecodeState(jnp.asarray(buf), jnp.asarray(lengths), logits, jnp.asarray(~live),
                            jnp.asarray(num_new), key)
        t0 = time.perf_counter()
        min_done = min(group, int(live.sum()))
        state, cache = decode(params, state, cache, d_all, eos_arr, jnp.asarray(stop_at), cfg, sampling,
                              step_cap, window, dispatch, stop_on_any=True, route=route_all,
                              min_done=jnp.asarray(min_done, jnp.int32))
        new_num = np.asarray(state.num_new)
        timing["decode"] += time.perf_counter() - t0
        steps = int((new_num - num_new)[live].max(initial=0))
        stats["decode_calls"] += 1
        stats["row_steps_busy"] += int((new_num - num_new)[live].sum())
        stats["row_steps_total"] += steps * B
        buf, lengths, num_new = np.array(state.buf), np.array(state.lengths), new_num.copy()
        logits, key = state.logits, state.key
        ended = []
        for r in np.flatnonzero(live):
            i = int(row_prompt[r])
            new = buf[r, lengths[r] - num_new[r]:lengths[r]]
            cut = None
            if stops[i] and num_new[r] > row_checked[r]:
                cut = _stop_cut(model.tokenizer, ids[i], new, stops[i], int(row_checked[r]))
                row_checked[r] = num_new[r]
            if cut is not None:
                finish(r, cut, True)
                ended.append(r)
            elif (num_new[r] > 0 and int(new[-1]) in eos_set) or num_new[r] >= budgets[i]:
                finish(r)
                ended.append(r)
            elif opts is not None and num_new[r] == stop_at[r] and opts.wants_phase(int(row_phases[r])) \
                    and num_new[r] == row_phases[r] * opts.interval:
                pending.add(r)
        refill(ended)

    timing["total"] = time.perf_counter() - t_start
    stats["idle_fraction"] = 1 - stats["row_steps_busy"] / max(1, stats["row_steps_total"])
    texts = None
    if model.tokenizer is not None:
        texts = []
        for i, t in enumerate(out_tokens):
            text = model.decode(t)
            if out_stopped[i]:
                at = _find_stop(text, stops[i])
                text = text[:at] if at >= 0 else text
            texts.append(text)
    return QueueResult(out_tokens, out_deltas, out_phases, out_stopped, timing, stats, texts, out_opt)


def _stop_cut(tok, prompt_ids, new, stops, checked: int) -> Optional[int]:
    """The number of new tokens up to (and including) the one that completes the first stop string
    in the completion text, or None. Only tokens after `checked` can complete a new one."""
    def text_of(k):
        full = tok.decode(list(prompt_ids) + [int(t) for t in new[:k]], skip_special_tokens=True)
        head = tok.decode(list(prompt_ids), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode([int(t) for t in new[:k]],
                                                                          skip_special_tokens=True)
    if _find_stop(text_of(len(new)), stops) < 0:
        return None
    for k in range(max(1, checked), len(new) + 1):   # the first prefix whose text holds a stop string
        if _find_stop(text_of(k), stops) >= 0:
            return k
    return len(new)
