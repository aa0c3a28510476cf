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
  2. one decode call over the whole batch (`run_decode`: device calls of a few tokens, chunks),
     each row with its own budget (up to its next phase boundary, its own max_new_tokens, or the
     next stop-string check), returning at the first chunk boundary where `refill_group` rows
     (default a quarter of the batch) have finished or reached a phase (`stop_on_any=True,
     min_done=...`; on CPU the chunk itself stops there, see `DecodeChunks`);
  3. finished rows are collected and refilled.
Compiled programs: per context bucket one phase and one prefill per power-of-two sub-batch size,
one decode per attention window bucket, and a few tiny gathers / scatters.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..api import Model, check_token_ids
from ..model.transformer import batched_route
from ..rewire import RewireOptions, bucket_length
from ..rewire.selection import init_opt_state
from ..model import batched_deltas
from .engine import STOP_CHECK, QueueEngine, Request, _find_stop, _stop_cut  # noqa: F401 (re-exported)
from .generate import DECODE_CHUNK, _prompts_to_ids
from .sampling import Sampling


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


def generate_queue(model: Model, prompts, max_new_tokens=128, *, batch_size: int = 16,
                   rewire: Optional[RewireOptions] = None, sampling: Sampling = Sampling(), seed: int = 0,
                   deltas=None, eos_token_id: Any = "config", stops=None, cache_len: Optional[int] = None,
                   dispatch: Optional[str] = None, on_finish=None, route=None,
                   refill_group: Optional[int] = None, opt_state=None, chunks=None) -> QueueResult:
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
    chunks: how decode is cut into device calls (`DecodeChunks`, default per backend); ended rows
    are refilled at chunk boundaries. Greedy tokens do not depend on it.
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

    eng = QueueEngine(model, B, S, step_cap=step_cap, eos_token_id=eos_token_id, seed=seed, dispatch=dispatch,
                      refill_group=group, d0=d0, o=o, route_type=None if route_np is None else type(route_np),
                      chunks=chunks)
    out_opt_split = None if opt_state is None else [jax.tree.map(lambda a: a[i:i + 1], opt_init) for i in range(n)]
    reqs = [Request(ids[i], budgets[i], stops[i], opts, sampling,
                    deltas=None if d_init is None else d_init[i],
                    opt_state=None if out_opt_split is None else out_opt_split[i],
                    route=None if route_np is None else tuple(a[i] for a in route_np), tag=i,
                    on_done=(lambda q: on_finish(q.tag, q.tokens)) if on_finish else None) for i in range(n)]
    for q in reqs:
        eng.submit(q)
    eng.run_until_idle()
    out_tokens = [q.tokens for q in reqs]
    out_deltas = [q.deltas_out for q in reqs]
    out_phases = [q.phases for q in reqs]
    out_stopped = [q.stopped for q in reqs]
    out_opt = [q.opt_out for q in reqs]
    timing, stats = eng.timing, eng.stats

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
