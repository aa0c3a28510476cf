"""The server's generation engine: one `QueueEngine` in one background thread that owns JAX, fed by
the (async) HTTP handlers through its thread-safe waiting list; results come back to the event
loop through `loop.call_soon_threadsafe` into one asyncio.Queue per request.

Continuous batching: a request joins the running batch as soon as a row is free (a row freed by one
request takes the next waiting one); each request runs its own rewiring cycle from its own deltas.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from ..generation.engine import QueueEngine, QueueFull, Request
from ..rewire import bucket_length

__all__ = ["QueueFull", "Request", "ServeEngine"]


class ServeEngine:
    """`QueueEngine(model, batch_size, cache_len)` run by a daemon thread until `shutdown`."""

    def __init__(self, model, batch_size: int = 16, max_queue: int = 256, cache_len: Optional[int] = None,
                 step_cap: int = 16, seed: int = 0):
        self.model = model
        self.cache_len = int(cache_len or bucket_length(model.config.max_position_embeddings))
        self._args = dict(batch_size=batch_size, cache_len=self.cache_len, step_cap=step_cap, seed=seed,
                          max_waiting=max_queue)
        self.engine: Optional[QueueEngine] = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.cancelled = 0   # requests whose client went away before the end (their rows freed early)
        self.thread = threading.Thread(target=self._run, name="rewire-jax-engine", daemon=True)

    def start(self, timeout: float = 600.0) -> None:
        self.thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the generation engine did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:   # built in this thread: every JAX call of the engine happens here
            a = self._args
            # one sub-batch size (a quarter of the batch, as the refill group): arrivals in any order
            # reuse the same compiled phase / prefill programs; each request samples from its own key
            self.engine = QueueEngine(self.model, a["batch_size"], a["cache_len"], step_cap=a["step_cap"],
                                      seed=a["seed"], max_waiting=a["max_waiting"], row_keys=True,
                                      sub_batch=max(1, a["batch_size"] // 4),
                                      join_steps=max(1, a["step_cap"] // 4))
        except BaseException as e:   # handed to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.engine.serve_forever(self._stop)

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop, stream: bool) -> asyncio.Queue:
        """Queue `req` (QueueFull if the waiting list is full). -> an asyncio.Queue receiving
        ("tokens", new_tokens_so_far) after each decode call (if stream) and ("done", req)."""
        events: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:   # the loop is closed (shutdown): nobody is listening
                pass

        if stream:   # the first tokens at once, then every step_cap tokens (short decode calls while
            sent = [0]  # rows are free would otherwise make 4x the SSE chunks)

            def tokens(q: Request, toks: list) -> None:
                if sent[0] == 0 or len(toks) - sent[0] >= self._args["step_cap"]:
                    sent[0] = len(toks)
                    put(("tokens", toks))
            req.on_tokens = tokens

        def done(q: Request) -> None:
            self.cancelled += q.cancelled
            put(("done", q))
        req.on_done = done
        self.engine.submit(req)
        return events

    @property
    def load(self) -> dict:
        e = self.engine
        return {"active": e.active if e else 0, "waiting": e.waiting if e else 0,
                "batch_size": self._args["batch_size"], "max_queue": self._args["max_waiting"],
                "cancelled": self.cancelled}

    def shutdown(self, timeout: float = 60.0) -> None:
        """Let the engine finish what it holds, then stop its thread."""
        self._stop.set()
        if self.engine is not None:
            self.engine.wake()
        self.thread.join(timeout)
