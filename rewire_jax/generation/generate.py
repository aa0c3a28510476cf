"""Rewired generation: alternate in-context routing optimisation and steered decoding.

    result = rewire_jax.generate(model, ["def fib(n):"], max_new_tokens=256, rewire=RewireOptions())

Cycle (per batch, all sequences in lockstep; each behaves exactly as if alone):
  phase on the prompt -> prefill with the new deltas -> decode `interval` tokens -> phase on
  prompt+generated -> prefill (the KV cache must reflect the new deltas) -> decode ... until every
  sequence hit EOS or max_new_tokens. rewire=None is the baseline (no optimisation at all).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..api import Model, check_token_ids
from ..rewire import RewireOptions, bucket_length, start_cycle
from ..model.transformer import batched_route, prepare_params
from .decode import DecodeChunks, DecodeState, decode_window, default_chunks, prefill, run_decode
from .grouping import phase_grouped
from .sampling import Sampling


DECODE_CHUNK = 128   # tokens per decode call when no phase comes between (baseline, continuous=False)


@dataclasses.dataclass
class PhaseRecord:
    """One optimisation phase. Arrays are per sequence ([B] or [B, L_moe])."""

    index: int
    context_len: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    seconds_optimise: float
    seconds_prefill: float


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns: new tokens (and texts with a tokenizer) per sequence, the final
    deltas [B, L_moe, E], one `PhaseRecord` per phase and the seconds spent per part."""

    tokens: list[list[int]]        # new tokens per sequence (EOS included when emitted)
    deltas: np.ndarray             # [B, L_moe, E] final deltas
    phases: list[PhaseRecord]
    timing: dict[str, float]       # seconds: optimise, prefill, decode, total (+ compile)
    texts: Optional[list[str]] = None
    opt_state: Any = None          # final Adam state ([B, ...] leaves, host arrays): continue with generate(opt_state=)

    def phase_dicts(self, row: int = 0) -> list[dict]:
        """JSON-friendly per-phase history of one sequence."""
        return [{"context_len": int(p.context_len[row]), "loss_before": float(p.loss_before[row]),
                 "loss_after": float(p.loss_after[row]), "scores": p.scores[row].tolist(),
                 "weights": p.weights[row].tolist()} for p in self.phases if p.context_len[row] > 0]


def _prompts_to_ids(model: Model, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))):
        prompts = [prompts]
    out = []
    for p in prompts:
        ids = model.encode(p) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise ValueError("empty prompt: give at least one token (a text that tokenizes to something)")
        out.append(ids)
    if not out:
        raise ValueError("no prompts given")
    return out


def generate(model: Model, prompts, max_new_tokens: int = 128, *, rewire: Optional[RewireOptions] = None,
             sampling: Sampling = Sampling(), seed: int = 0, deltas=None, eos_token_id: Any = "config",
             cache_len: Optional[int] = None, on_segment: Optional[Callable[[int, list[list[int]]], None]] = None,
             on_phase: Optional[Callable[[PhaseRecord], None]] = None, dispatch: Optional[str] = None,
             route=None, opt_state=None, segment: Optional[int] = None,
             chunks: Optional[DecodeChunks] = None) -> GenerationResult:
    """Generate with (or, rewire=None / selection='none', without) test-time rerouting.

    prompts: a string, a list of token ids, or a list of either (a batch; lengths may differ).
    deltas: initial deltas (default zeros), [L_moe, E] or [B, L_moe, E].
    eos_token_id: 'config' (the model's eos ids), None (never stop early), an int or a list.
    cache_len: KV cache rows (default: longest prompt + max_new_tokens, rounded up).
    on_segment(row_count, new_tokens_so_far) is called after every decoded segment (streaming);
    If on_segment returns True, generation ends there for every row (the tokens so far are
    returned; no further phase runs): stop strings, a cancelled request.
    on_phase(record) after every optimisation phase.
    opt_state: the Adam state to start from (default fresh), [B, ...] leaves as `init_opt_state`
    lays them out, e.g. the `opt_state` of a previous result: with `deltas`, a cycle continues
    where an earlier call left it (a conversation's next turn).
    segment: tokens per decode call (default: `interval` with continuous rewiring, else 32 when
    streaming, else 128). With continuous rewiring it must divide `interval`: phases still come
    every `interval` tokens, only the streaming granularity changes.
    chunks: how a segment is cut into device calls (`DecodeChunks`; default `default_chunks()`,
    per backend); the tokens do not depend on it.
    dispatch: expert dispatch path for this call (default: model.config.dispatch).
    route: None, or a routing override (`rewire_jax.model.moe.RouteOverride`, one for all rows or
    [B, ...] arrays) used in every prefill and decode step (C3PO; not combined with rewiring).
    A prompt + max_new_tokens longer than the model's max_position_embeddings runs, with a warning.
    """
    cfg = model.config
    t_start = time.perf_counter()
    ids = _prompts_to_ids(model, prompts)
    check_token_ids(np.concatenate([np.asarray(p) for p in ids]), cfg.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    opts = rewire if (rewire is not None and rewire.enabled) else None
    B, longest = len(ids), max(len(p) for p in ids)
    if route is not None and opts is not None:
        raise ValueError("a routing override (route=) and rewiring (rewire=) cannot be combined")
    route = batched_route(route, B, cfg)
    needed = longest + max_new_tokens
    if cache_len is None:
        cache_len = bucket_length(needed)
    elif longest >= cache_len or needed > cache_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} does not "
                         f"fit in cache_len={cache_len}; raise cache_len or shorten the prompt")
    if needed > cfg.max_position_embeddings:
        warnings.warn(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} positions exceeds "
                      f"the model's max_position_embeddings ({cfg.max_position_embeddings}); outputs past that "
                      f"are outside what the model was trained on", stacklevel=2)
    eos = cfg.eos_token_ids if eos_token_id == "config" else (
        () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist()))

    buf = np.zeros((B, cache_len), np.int32)
    for b, p in enumerate(ids):
        buf[b, :len(p)] = p
    lengths = np.array([len(p) for p in ids], np.int32)
    cycle = start_cycle(cfg, opts or RewireOptions(), B, deltas, opt_state)
    params = prepare_params(model.params, cfg)   # unrolled stacks: per-layer buffers, once per call
    state = DecodeState(jnp.asarray(buf), jnp.asarray(lengths), None, jnp.zeros(B, bool),
                        jnp.zeros(B, jnp.int32), jax.random.key(seed))
    deltas0, opt0, state = _committed_like((cycle.deltas, cycle.opt_state, state), params)
    cycle = cycle._replace(deltas=deltas0, opt_state=opt0)
    eos_arr = jnp.asarray(np.array(eos, np.int32).reshape(-1))
    timing = {"optimise": 0.0, "prefill": 0.0, "decode": 0.0}
    phases: list[PhaseRecord] = []
    if segment is not None and (segment < 1 or (opts and opts.continuous and opts.interval % segment)):
        raise ValueError(f"segment={segment} must be >= 1 and divide the rewiring interval "
                         f"({opts.interval if opts else None}): phases come every interval tokens")
    if segment is None and opts and opts.continuous:
        segment = opts.interval   # one phase per segment
    elif segment is None:   # decode in chunks (streaming; and each chunk attends over a window bucket of the cache)
        segment = min(max_new_tokens, 32 if on_segment is not None else DECODE_CHUNK)
    chunks = chunks or default_chunks()
    cache = None
    steps_done = 0   # decode steps so far (every live row has made each of them: lock-step)

    while True:
        done = np.asarray(state.done)
        if done.all():
            break
        need_phase = opts is not None and opts.wants_phase(len(phases)) and steps_done == len(phases) * opts.interval
        if need_phase or cache is None:
            cur = np.asarray(state.lengths)
            Tb = bucket_length(int(cur.max()), cap=cache_len)
            ctx = state.buf[:, :Tb]
            record = None
            if need_phase:
                t0 = time.perf_counter()
                # rows grouped by context bucket: a short context does not pay for the longest
                cycle, out = phase_grouped(params, cycle, state.buf, cur, ~done, cache_len, cfg, opts, dispatch)
                t1 = time.perf_counter()
                timing["optimise"] += t1 - t0
                record = PhaseRecord(len(phases), np.where(done, 0, cur), np.asarray(out.loss), None,
                                     np.asarray(out.scores), np.asarray(out.weights), t1 - t0, 0.0)
            t0 = time.perf_counter()
            logits, cache, loss_after = prefill(params, ctx, state.lengths, cycle.deltas, cfg, cache_len,
                                               opts.loss if opts else None, dispatch, route)
            logits.block_until_ready()
            timing["prefill"] += time.perf_counter() - t0
            state = state._replace(logits=logits)
            if record is not None:
                record.loss_after = np.asarray(loss_after)
                record.seconds_prefill = time.perf_counter() - t0
                phases.append(record)
                if on_phase:
                    on_phase(record)
        t0 = time.perf_counter()
        window = decode_window(int(np.asarray(state.lengths).max()) + segment, cache_len, chunks.masked)
        state, cache = run_decode(params, state, cache, cycle.deltas, eos_arr, jnp.int32(max_new_tokens), cfg,
                                  sampling, segment, window, dispatch, route=route, chunks=chunks)
        jax.block_until_ready(state.num_new)
        timing["decode"] += time.perf_counter() - t0
        steps_done += segment
        if on_segment and on_segment(*_new_tokens(state, lengths)) is True:
            break

    new_tokens = _new_tokens(state, lengths)[1]
    timing["total"] = time.perf_counter() - t_start
    texts = [model.decode(t) for t in new_tokens] if model.tokenizer is not None else None
    return GenerationResult(new_tokens, np.asarray(cycle.deltas), phases, timing, texts,
                            jax.tree.map(np.asarray, cycle.opt_state))


def _committed_like(tree, params):
    """The start state (deltas, Adam state, decode state) placed like the params when those sit
    committed on one device. Jitted outputs are, so the first decode call (fresh inputs) and the
    later ones (the previous call's outputs), and a baseline call (never a phase) and a rewired one,
    share their compiled programs: jit's cache keys on the arguments' placement (results unchanged)."""
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if getattr(leaf, "committed", False) and isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(tree, sharding)
    return tree


def _new_tokens(state: DecodeState, prompt_lengths) -> tuple[int, list[list[int]]]:
    buf, lengths = np.asarray(state.buf), np.asarray(state.lengths)
    return len(buf), [buf[b, prompt_lengths[b]:lengths[b]].tolist() for b in range(len(buf))]
