"""The generation queue's engine: `batch_size` rows kept full from a waiting list that any thread
may add to (continuous batching). `generate_queue` submits every prompt up front and runs it to
the end; the server (`rewire_jax.serve`) runs it in a background thread and submits requests as
they arrive.

    eng = QueueEngine(model, batch_size=16, cache_len=1024, step_cap=16)
    req = eng.submit(Request(ids, 64, rewire=RewireOptions(), on_tokens=..., on_done=...))
    eng.serve_forever(stop_event)        # or eng.run_until_idle()

Each request carries its own rewiring options (None: the model's own routing), sampling, stop
strings, start deltas and Adam state; it runs its own cycle (a phase on its prompt, then one every
`interval` tokens) exactly as `generate` runs it alone (greedy; tests/test_queue.py). Rows whose
requests need a phase are grouped by (options, context bucket); a decode call runs the rows of one
sampling setting (the other rows wait, their cache untouched below the window). How a step runs is
described in generation/queue.py. Callbacks run in the engine's thread.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.transformer import prepare_params
from ..rewire import CycleState, RewireOptions, bucket_length, run_phase
from ..rewire.selection import init_opt_state
from .decode import DecodeChunks, DecodeState, decode_window, default_chunks, prefill, run_decode
from .grouping import _padded_rows, _pow2, _put, _take, phase_token_cap, plan_groups
from .sampling import Sampling

#: with stop strings, a row's decode budget reaches at most this many tokens past its last check
STOP_CHECK = 32


class QueueFull(RuntimeError):
    """The waiting list holds `max_waiting` requests already."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate, and (once `done`) what it produced."""

    ids: list                                  # prompt token ids
    max_new_tokens: int
    stops: tuple = ()                          # stop strings (need the model's tokenizer)
    rewire: Optional[RewireOptions] = None     # None (or selection='none'): the model's own routing
    sampling: Sampling = Sampling()
    deltas: Optional[np.ndarray] = None        # [L_moe, E] start deltas (default zeros)
    opt_state: Any = None                      # [1, ...] leaves: the Adam state to continue (default fresh)
    route: Any = None                          # one row of a RouteOverride (host arrays) or None
    on_tokens: Optional[Callable[["Request", list], None]] = None   # new tokens so far, after each decode call
    on_done: Optional[Callable[["Request"], None]] = None
    tag: Any = None
    seed: Optional[int] = None                 # with per-row keys: its sampling key (default: the engine's next)
    # filled in by the engine
    tokens: Optional[list] = None              # new tokens (cut after a stop string)
    deltas_out: Optional[np.ndarray] = None    # [L_moe, E]
    opt_out: Any = None                        # [1, ...] leaves
    phases: list = dataclasses.field(default_factory=list)
    stopped: bool = False                      # a stop string ended it
    cancelled: bool = False
    error: Optional[BaseException] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    _serial: int = 0                           # its arrival number (set by submit)

    def cancel(self) -> None:
        """Free its row at the next decode boundary (or drop it from the waiting list)."""
        self._cancel.set()

    @property
    def opts(self) -> Optional[RewireOptions]:
        return self.rewire if (self.rewire is not None and self.rewire.enabled) else None


class QueueEngine:
    """A fixed batch [B, S] of rows, refilled from a thread-safe waiting list (see module doc).

    d0 [L_moe, E] / o: the deltas and options the batch's empty rows start from (shapes only);
    route_type: the RouteOverride class when requests carry routing overrides."""

    def __init__(self, model, batch_size: int, cache_len: int, *, step_cap: int, eos_token_id: Any = "config",
                 seed: int = 0, dispatch: Optional[str] = None, refill_group: Optional[int] = None,
                 d0=None, o: Optional[RewireOptions] = None, route_type=None, max_waiting: Optional[int] = None,
                 chunks: Optional[DecodeChunks] = None, row_keys: bool = False, sub_batch: Optional[int] = None,
                 join_steps: Optional[int] = None):
        cfg = self.cfg = model.config
        self.model, self.B, self.S, self.step_cap, self.dispatch = model, int(batch_size), int(cache_len), \
            int(step_cap), dispatch
        B = self.B
        self.group = max(1, B // 4) if refill_group is None else int(refill_group)
        self.chunks = chunks or default_chunks()   # decode device calls; ended rows are refilled between them
        if self.group < 1:
            raise ValueError(f"refill_group must be >= 1, got {refill_group}")
        # sub_batch: every refill / phase / prefill sub-batch has exactly this many rows (padded, more
        # rows in several calls): one program per context bucket, not one per sub-batch size. For a
        # server, whose arrivals give every size in turn (each a compilation); None: `_pow2` sizes.
        self.sub_batch = None if sub_batch is None else max(1, min(int(sub_batch), B))
        # join_steps: while some rows are free, a decode call makes at most this many steps, so that
        # a request arriving meanwhile (a server's next request) waits less for a row
        self.join_steps = join_steps
        eos = cfg.eos_token_ids if eos_token_id == "config" else (
            () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist()))
        self.eos_set = set(int(e) for e in eos)
        self.eos_arr = jnp.asarray(np.array(eos, np.int32).reshape(-1))
        o = o or RewireOptions()
        self.d0 = jnp.zeros(cfg.delta_shape, jnp.float32) if d0 is None else d0
        self.params = prepare_params(model.params, cfg)
        self.buf = np.zeros((B, self.S), np.int32)
        self.lengths = np.ones(B, np.int32)
        self.num_new = np.zeros(B, np.int32)
        self.rows: list = [None] * B                 # the request each row holds
        self.row_phases = np.zeros(B, np.int64)      # phases run for the row's sequence
        self.row_checked = np.zeros(B, np.int64)     # new tokens already searched for stop strings
        self.d_all = jnp.broadcast_to(self.d0, (B, *cfg.delta_shape)) + 0.0
        self.opt_all = init_opt_state(o, self.d_all)
        self.fresh_one = init_opt_state(o, self.d0[None])
        self.logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
        self.cache = None
        self.key = jax.random.key(seed)
        # row_keys: each request samples from its own key (key(req.seed), or the engine key folded with
        # its arrival number), whatever its neighbours; otherwise the batch shares one key stream
        self.row_keys, self._serial = row_keys, 0
        self.keys = jax.random.split(self.key, B) if row_keys else None
        self.route_type, self.route_all = route_type, None
        if route_type is not None:   # empty rows: alpha 1, the model's own routing
            self.route_all = route_type(jnp.zeros((B, *cfg.delta_shape), jnp.float32),
                                        jnp.ones((B, cfg.num_moe_layers), jnp.float32), jnp.zeros(B, jnp.int32))
        self.pending: set = set()   # rows whose sequence needs a phase / prefill before decoding on
        self.timing = {"optimise": 0.0, "prefill": 0.0, "decode": 0.0}
        self.stats = {"decode_calls": 0, "row_steps_busy": 0, "row_steps_total": 0, "phase_calls": 0,
                      "phase_rows": 0, "phase_rows_padded": 0, "prefill_calls": 0, "refills": 0}
        self.max_waiting = max_waiting
        self._waiting: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._opt_ids: dict = {}   # RewireOptions -> a small int (phase groups sort by it)

    # ---- the waiting list (any thread) -----------------------------------------------------------
    def submit(self, req: Request) -> Request:
        with self._cond:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (the limit)")
            req._serial, self._serial = self._serial, self._serial + 1   # its key, without a seed
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def _next_waiting(self) -> Optional[Request]:
        with self._cond:
            while self._waiting:
                req = self._waiting.popleft()
                if not req._cancel.is_set():
                    return req
                self._end(req, cancelled=True)
        return None

    # ---- running ---------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Run until every submitted request is done (the offline queue)."""
        self.refill(range(self.B))
        while self.step():
            pass

    def serve_forever(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Run until `stop` is set and nothing is left (in flight or waiting). An error fails the
        requests in flight (their `error`) and the engine carries on with the next ones."""
        while True:
            with self._cond:
                if self.active == 0 and not self._waiting:
                    if stop.is_set():
                        return
                    self._cond.wait(idle_wait)
                    continue
            try:
                self.refill([r for r in range(self.B) if self.rows[r] is None])
                self.step()
            except Exception as e:   # fail what was in flight, keep serving
                for r in range(self.B):
                    if self.rows[r] is not None:
                        req, self.rows[r] = self.rows[r], None
                        self._end(req, error=e)
                self.pending.clear()
                self.cache = None   # a failed (donating) decode may have consumed it

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _opt_id(self, opts: Optional[RewireOptions]) -> int:
        return -1 if opts is None else self._opt_ids.setdefault(opts, len(self._opt_ids))

    def refill(self, rows) -> None:
        cfg, B = self.cfg, self.B
        filled = []
        for r in rows:
            req = self._next_waiting()
            self.rows[r] = req
            if req is None:
                continue
            p = req.ids
            self.buf[r] = 0
            self.buf[r, :len(p)] = p
            self.lengths[r], self.num_new[r] = len(p), 0
            self.row_phases[r], self.row_checked[r] = 0, 0
            filled.append(r)
            self.pending.add(r)
        if not filled:
            return
        self.stats["refills"] += len(filled)
        k = self.sub_batch or B
        for i in range(0, len(filled), k):
            self._load_rows(filled[i:i + k])

    def _load_rows(self, filled) -> None:
        """Start deltas, Adam states (keys, routes) of the requests just put in rows `filled`."""
        cfg, B = self.cfg, self.B
        idx = jnp.asarray(_padded_rows(filled, B, self.sub_batch or _pow2(len(filled), B))[1])
        m = len(idx)
        reqs = [self.rows[r] for r in filled]
        reqs += [reqs[0]] * (m - len(reqs))
        if all(q.deltas is None for q in reqs):
            d = jnp.broadcast_to(self.d0, (m, *cfg.delta_shape)) + 0.0
        else:
            d = jnp.asarray(np.stack([np.zeros(cfg.delta_shape, np.float32) if q.deltas is None
                                      else np.asarray(q.deltas, np.float32) for q in reqs]))
        self.d_all = _put(self.d_all, d, idx)
        if all(q.opt_state is None for q in reqs):
            s = jax.tree.map(lambda a: jnp.broadcast_to(a, (m,) + a.shape[1:]), self.fresh_one)
        else:
            fresh = jax.tree.map(np.asarray, self.fresh_one)
            s = jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a, 0)),
                             *[fresh if q.opt_state is None else q.opt_state for q in reqs])
        self.opt_all = _put(self.opt_all, s, idx)
        if self.row_keys:
            self.keys = _put(self.keys, jnp.stack([jax.random.key(q.seed) if q.seed is not None else
                                                   jax.random.fold_in(self.key, q._serial) for q in reqs]), idx)
        if self.route_all is not None:
            self.route_all = _put(self.route_all, self.route_type(
                *(jnp.asarray(np.stack([np.asarray(q.route[k]) for q in reqs])) for k in range(3))), idx)

    def run_pending(self) -> None:
        S, B, cfg = self.S, self.B, self.cfg
        classes: dict = {}
        for r in sorted(self.pending):
            opts = self.rows[r].opts
            wants = opts is not None and opts.wants_phase(int(self.row_phases[r]))
            k = (self._opt_id(opts), wants, int(self.row_phases[r]) if (wants and opts.selection == "random") else 0)
            classes.setdefault(k, []).append((r, bucket_length(int(self.lengths[r]), cap=S)))
        groups = [(Tb, wants, pidx, rows) for (_, wants, pidx), rb in sorted(classes.items())
                  for Tb, rows in plan_groups(rb, self.sub_batch or B, phase_token_cap() if wants else None)]
        for Tb, wants, pidx, rows in groups:
            opts = self.rows[rows[0]].opts
            m = self.sub_batch or _pow2(len(rows), B)
            gather_idx, put_idx = _padded_rows(rows, B, m)
            gi, pi = jnp.asarray(gather_idx), jnp.asarray(put_idx)
            real = np.arange(m) < len(rows)
            ctx = jnp.asarray(self.buf[gather_idx, :Tb])
            lens = jnp.asarray(self.lengths[gather_idx])
            d_sub = _take(self.d_all, gi)
            record = None
            if wants:
                t0 = time.perf_counter()
                state = CycleState(d_sub, _take(self.opt_all, gi), pidx)
                state, res = run_phase(self.params, state, ctx, lens, cfg, opts, jnp.asarray(real), self.dispatch)
                d_sub = state.deltas
                jax.block_until_ready(d_sub)
                self.timing["optimise"] += time.perf_counter() - t0
                self.opt_all = _put(self.opt_all, state.opt_state, pi)
                self.d_all = _put(self.d_all, d_sub, pi)
                record = (np.asarray(res.loss), np.asarray(res.scores), np.asarray(res.weights))
                self.stats["phase_calls"] += 1
                self.stats["phase_rows"] += len(rows)
                self.stats["phase_rows_padded"] += m
            t0 = time.perf_counter()
            r_sub = None if self.route_all is None else _take(self.route_all, gi)
            lg, c_sub, loss_after = prefill(self.params, ctx, lens, d_sub, cfg, S, opts.loss if opts else None,
                                            self.dispatch, r_sub)
            self.logits = _put(self.logits, lg, pi)
            self.cache = jax.tree.map(lambda a: jnp.zeros(a.shape[:1] + (B,) + a.shape[2:], a.dtype), c_sub) \
                if self.cache is None else self.cache
            self.cache = _put(self.cache, c_sub, pi, axis=1)
            jax.block_until_ready(self.logits)
            self.timing["prefill"] += time.perf_counter() - t0
            self.stats["prefill_calls"] += 1
            if record is not None:
                la = np.asarray(loss_after)
                for j, r in enumerate(rows):
                    self.rows[r].phases.append({
                        "context_len": int(self.lengths[r]), "loss_before": float(record[0][j]),
                        "loss_after": float(la[j]), "scores": record[1][j].tolist(),
                        "weights": record[2][j].tolist()})
                    self.row_phases[r] += 1
        self.pending.clear()

    def step(self) -> bool:
        """Phases / prefills for the rows that need them, one decode call per sampling setting of the
        live rows, then the ended rows are finished and refilled. -> whether any row was live."""
        for r in range(self.B):   # cancelled requests free their rows first
            if self.rows[r] is not None and self.rows[r]._cancel.is_set():
                self._free(r, cancelled=True)
        self.run_pending()
        live = np.array([q is not None for q in self.rows])
        if not live.any():
            return False
        B = self.B
        # each row's budget for this call: its own max, its next phase boundary, its next stop check
        stop_at = np.zeros(B, np.int32)
        for r in np.flatnonzero(live):
            q = self.rows[r]
            b, opts = q.max_new_tokens, q.opts
            if opts is not None and opts.wants_phase(int(self.row_phases[r])):
                b = min(b, int(self.row_phases[r]) * opts.interval)
            if q.stops:
                b = min(b, int(self.num_new[r]) + STOP_CHECK)
            stop_at[r] = b
        if self.join_steps and not live.all():   # free rows: a request arriving now joins after join_steps
            stop_at[live] = np.minimum(stop_at[live], self.num_new[live] + self.join_steps)
        by_sampling: dict = {}
        for r in np.flatnonzero(live):
            by_sampling.setdefault(self.rows[r].sampling, []).append(r)
        before = self.num_new.copy()
        for sampling, rows in by_sampling.items():
            mask = np.zeros(B, bool)
            mask[rows] = True
            self._decode(sampling, mask, live, stop_at)
        ended = []
        for r in np.flatnonzero(live):
            if self.num_new[r] > before[r] and self.rows[r].on_tokens is not None:
                self.rows[r].on_tokens(self.rows[r], self._new(r).tolist())
            if self._check_end(r, stop_at):
                ended.append(r)
        self.refill(ended)
        return True

    def _decode(self, sampling: Sampling, mask, live, stop_at) -> None:
        """One decode call over the rows in `mask` (the other rows are marked done and wait)."""
        steps_left = int((stop_at - self.num_new)[mask].max())
        # the window covers every live row: a waiting row's dummy write lands at its own next position
        window = decode_window(int(self.lengths[live].max()) + min(self.step_cap, steps_left), self.S,
                               self.chunks.masked)
        state = DecodeState(jnp.asarray(self.buf), jnp.asarray(self.lengths), self.logits, jnp.asarray(~mask),
                            jnp.asarray(self.num_new), self.keys if self.row_keys else self.key)
        t0 = time.perf_counter()
        min_done = min(self.group, int(mask.sum()))
        state, self.cache = run_decode(self.params, state, self.cache, self.d_all, self.eos_arr, jnp.asarray(stop_at),
                                       self.cfg, sampling, self.step_cap, window, self.dispatch, stop_on_any=True,
                                       route=self.route_all, min_done=min_done, chunks=self.chunks)
        new_num = np.asarray(state.num_new)
        self.timing["decode"] += time.perf_counter() - t0
        steps = int((new_num - self.num_new)[mask].max(initial=0))
        self.stats["decode_calls"] += 1
        self.stats["row_steps_busy"] += int((new_num - self.num_new)[mask].sum())
        self.stats["row_steps_total"] += steps * self.B
        self.buf, self.lengths, self.num_new = np.array(state.buf), np.array(state.lengths), new_num.copy()
        self.logits = state.logits
        if self.row_keys:
            self.keys = state.key
        else:
            self.key = state.key

    def _new(self, r: int) -> np.ndarray:
        return self.buf[r, self.lengths[r] - self.num_new[r]:self.lengths[r]]

    def _check_end(self, r: int, stop_at) -> bool:
        q = self.rows[r]
        new = self._new(r)
        cut = None
        if q.stops and self.num_new[r] > self.row_checked[r]:
            cut = _stop_cut(self.model.tokenizer, q.ids, new, q.stops, int(self.row_checked[r]))
            self.row_checked[r] = self.num_new[r]
        opts = q.opts
        if cut is not None:
            self._free(r, cut=cut, stopped=True)
        elif (self.num_new[r] > 0 and int(new[-1]) in self.eos_set) or self.num_new[r] >= q.max_new_tokens:
            self._free(r)
        else:
            if opts is not None and self.num_new[r] == stop_at[r] and opts.wants_phase(int(self.row_phases[r])) \
                    and self.num_new[r] == self.row_phases[r] * opts.interval:
                self.pending.add(r)
            return False
        return True

    def _free(self, r: int, cut: Optional[int] = None, stopped: bool = False, cancelled: bool = False) -> None:
        """The row's request ends: its tokens, deltas and Adam state are taken; the row is empty."""
        q, self.rows[r] = self.rows[r], None
        self.pending.discard(r)
        toks = self._new(r).tolist()
        q.tokens = toks if cut is None else toks[:cut]
        q.deltas_out = np.asarray(self.d_all[r])
        q.opt_out = jax.tree.map(lambda a: np.asarray(a[r:r + 1]), self.opt_all)
        q.stopped = stopped
        self._end(q, cancelled=cancelled)

    @staticmethod
    def _end(q: Request, cancelled: bool = False, error: Optional[BaseException] = None) -> None:
        q.cancelled, q.error = cancelled, error
        try:
            if q.on_done is not None:
                q.on_done(q)
        finally:
            q.done.set()


def _find_stop(text: str, stops: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


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
