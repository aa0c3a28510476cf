"""`rewire-jax serve`: the OpenAI-compatible server (FastAPI + uvicorn, the `[serve]` extra).

It binds to 127.0.0.1 unless told otherwise; any other address needs --api-key (checked as
`Authorization: Bearer KEY`). SIGTERM drains: requests in flight finish, new ones get a 503,
conversation states are written after every turn anyway.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time

LOOPBACK_NAMES = ("localhost",)


def add_parser(sub) -> None:
    from ..cli_options import add_rewire_arguments
    from ..model.config import DISPATCH_METHODS
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with per-request rewiring, continuous "
                                     "batching and persistent conversations (needs the [serve] extra)")
    s.add_argument("--model", default=None, help="model directory or hub id (default: the bundled demo model, "
                                                 "with its chat template)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--batch-size", type=int, default=16, help="rows of the running batch")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond the batch; more get a 429")
    s.add_argument("--max-context", type=int, default=None,
                   help="positions per row (prompt + max_tokens; default: the model's max_position_embeddings)")
    s.add_argument("--state-dir", metavar="DIR", default=None,
                   help="where conversation states are written after each turn (default: memory only)")
    s.add_argument("--api-key", default=os.environ.get("REWIRE_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (env REWIRE_JAX_API_KEY)")
    s.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template file (needed for chat when the model has none)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    s.add_argument("--baseline", action="store_true", help="requests default to no rewiring ('rewire' turns it on)")
    add_rewire_arguments(s)
    s.add_argument("--seed", type=int, default=0, help="the engine's sampling key (and random selection)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--dispatch", choices=DISPATCH_METHODS, default="auto")
    s.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds SIGTERM waits for requests in flight")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("REWIRE_JAX_COMPILE_CACHE"),
                   help="keep compiled XLA programs in DIR (default: the CLI's per-user cache)")
    s.add_argument("--no-compile-cache", action="store_true", help="compile everything, keep nothing on disk")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(a) -> int:
    if not is_loopback(a.host) and not a.api_key:
        print(f"error: refusing to bind to {a.host} without --api-key: anyone who can reach it could use the "
              f"model; pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind to 127.0.0.1",
              file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: `rewire-jax serve` needs FastAPI and uvicorn ({e}); pip install 'rewire-jax[serve]'",
              file=sys.stderr)
        return 2
    for name in ("batch_size", "max_queue"):
        if getattr(a, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from .. import compile_cache
    from ..api import load
    from ..conversation import template as T
    from ..conversation.repl import DEMO_TEMPLATE
    from ..demo import DEMO_MODEL
    from ..cli_options import rewire_options
    from .app import ServeConfig, create_app

    if not a.no_compile_cache:
        compile_cache.enable(a.compile_cache or compile_cache.default_dir())
    model = load(a.model or DEMO_MODEL, dtype=a.dtype, dispatch=a.dispatch)
    chat_template = a.chat_template or (str(DEMO_TEMPLATE) if a.model is None else None)
    template = None
    try:
        template = T.resolve_template(model, chat_template)
    except T.TemplateError as e:
        if chat_template is not None:   # a template given but unusable: say so now
            raise ValueError(str(e)) from None
        print(f"note: {e}; chat requests will get a 400", file=sys.stderr)
    if a.max_context is not None and not 16 <= a.max_context:
        raise ValueError(f"--max-context must be >= 16, got {a.max_context}")
    if a.state_dir and os.path.exists(a.state_dir) and not os.path.isdir(a.state_dir):
        raise ValueError(f"--state-dir {a.state_dir} exists and is not a directory")
    opts = None if a.baseline else rewire_options(a)
    cfg = ServeConfig(model_name=a.served_model_name or a.model or "rewire-jax-demo", rewire=opts,
                      chat_template=template, api_key=a.api_key, state_dir=a.state_dir, batch_size=a.batch_size,
                      max_queue=a.max_queue, max_context=a.max_context)
    app = create_app(model, cfg)

    class Server(uvicorn.Server):
        """SIGTERM drains: the socket stays open and new requests get a 503 while the engine finishes
        what it holds (up to --drain-timeout); then uvicorn's shutdown waits for the responses to be
        sent and the process exits 0. SIGINT (or a second SIGTERM) exits as uvicorn does."""
        drain_since = None

        def handle_exit(self, sig, frame):
            app.state.draining = True
            if sig == signal.SIGTERM and self.drain_since is None:
                self.drain_since = time.monotonic()   # on_tick sets should_exit once drained
            elif sig == signal.SIGTERM:
                self.should_exit = True
            else:
                super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_since is not None and not self.should_exit:
                load = app.state.engine.load
                timed_out = time.monotonic() - self.drain_since > a.drain_timeout
                if timed_out or load["active"] + load["waiting"] + app.state.in_flight == 0:
                    self.should_exit = True
            return await super().on_tick(counter)

    server = Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                   timeout_graceful_shutdown=a.drain_timeout))
    print(f"rewire-jax serve: {cfg.model_name} on http://{a.host}:{a.port} (batch {a.batch_size}, "
          f"{'baseline' if opts is None else 'rewired'} by default)", file=sys.stderr, flush=True)
    server.run()
    return 0
