"""The FastAPI app: OpenAI's routes (/v1/models, /v1/completions, /v1/chat/completions, SSE
streaming ending in `data: [DONE]`), /health, OpenAI-style errors, the API key and the drain.

Every response carries a `rewire` object: whether rewiring ran, its options, the phases of the
reply (context length, loss before / after) and, for a conversation, its id, turn and status.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation.engine import QueueFull, Request, _find_stop
from .conversations import ConversationStore
from .engine import ServeEngine
from .protocol import COMPLETIONS_DEFAULT_MAX, ApiError, GenRequest, check_length, parse


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How the server runs (the CLI's options)."""

    model_name: str                       # the id /v1/models lists and requests must name
    rewire: Optional[object] = None       # RewireOptions: the default for requests (None: baseline)
    chat_template: Optional[str] = None   # Jinja text (None: chat requests get a 400)
    api_key: Optional[str] = None         # required as `Authorization: Bearer KEY` on /v1/*
    state_dir: Optional[str] = None
    batch_size: int = 16
    max_queue: int = 256
    max_context: Optional[int] = None     # KV cache rows (default: the model's maximum)
    step_cap: int = 16                    # decode steps per engine call (streaming granularity)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(model, config: ServeConfig) -> FastAPI:
    """The app over a loaded model. Its lifespan starts the engine thread and drains it at shutdown."""
    engine = ServeEngine(model, config.batch_size, config.max_queue, config.max_context, config.step_cap)
    limit = min(engine.cache_len, model.config.max_position_embeddings)
    store = ConversationStore(model, config.chat_template, config.state_dir) if config.chat_template else None
    tok = model.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(engine.start)
        yield
        app.state.draining = True
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="rewire-jax", lifespan=lifespan)
    app.state.draining = False   # set on SIGTERM (cli.py): new requests get a 503, those in flight finish
    app.state.engine = engine
    app.state.in_flight = 0     # /v1/ requests not yet answered

    class Guard:
        """/v1/*: a 503 while draining, the API key; counts the requests in flight (until their
        response, streamed or not, is sent). Plain ASGI, not BaseHTTPMiddleware: that one hides the
        client's disconnect from the handlers (a non-streamed request would keep its row) and copies
        every streamed chunk through a memory stream."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
                return await self.inner(scope, receive, send)
            if app.state.draining:
                return await _error(ApiError(503, "the server is shutting down; retry on another instance",
                                             type="server_error", code="shutting_down"))(scope, receive, send)
            if config.api_key is not None:
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(got, f"Bearer {config.api_key}".encode()):
                    return await _error(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                                      "KEY' with the server's --api-key",
                                                 type="invalid_request_error", code="invalid_api_key"))(
                        scope, receive, send)
            app.state.in_flight += 1   # the drain (cli.py) waits for these and the engine's rows
            try:
                await self.inner(scope, receive, send)
            finally:
                app.state.in_flight -= 1

    app.add_middleware(Guard)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error(e)

    @app.get("/health")
    async def health():
        return {"status": "draining" if app.state.draining else "ok", "model": config.model_name, **engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                             "owned_by": "rewire-jax"}]}

    async def body_of(request: HttpRequest, chat: bool) -> GenRequest:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", None,
                           "invalid_json") from None
        if isinstance(body, dict) and body.get("model") not in (None, config.model_name):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist here; this server serves "
                                f"{config.model_name!r} (GET /v1/models)", "model", "model_not_found")
        return parse(body, chat, config.rewire, tok, model.config.vocab_size)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        g = await body_of(request, chat=False)
        max_tokens = g.max_tokens or COMPLETIONS_DEFAULT_MAX
        for p in g.prompts:
            check_length(len(p), max_tokens, limit)
        return await run(request, g, [p for p in g.prompts], max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        g = await body_of(request, chat=True)
        if store is None:
            raise ApiError(400, f"the model {config.model_name!r} has no chat template and the server was started "
                                f"without --chat-template FILE; restart it with one, or use /v1/completions",
                           "messages", "no_chat_template")
        cid = g.conversation_id or f"_tmp-{uuid.uuid4().hex}"
        turn = store.begin(cid, g.messages, g.rewire, g.max_tokens, limit)
        if g.conversation_id is None:   # a one-off chat: nothing is kept
            store.release(cid)
        return await run(request, g, [turn.turn.context], turn.max_tokens, chat=True, turn=turn,
                         keep=g.conversation_id is not None)

    async def run(request: HttpRequest, g: GenRequest, prompts: list, max_tokens: int, chat: bool, turn=None,
                  keep: bool = False):
        loop = asyncio.get_running_loop()
        args = turn.generate_args if turn is not None else dict(rewire=g.rewire, deltas=None)
        reqs = [Request(p, max_tokens, g.stops, args["rewire"], g.sampling,
                        deltas=None if args.get("deltas") is None else args["deltas"][0],
                        opt_state=args.get("opt_state"), seed=g.seed) for p in prompts]
        queues = []
        try:
            for q in reqs:
                queues.append(engine.submit(q, loop, g.stream))
        except QueueFull:
            for q in reqs:
                q.cancel()
            if keep:
                store.release(turn.conversation_id)
            raise ApiError(429, f"the server is at capacity ({config.max_queue} requests waiting); retry later",
                           type="rate_limit_exceeded", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = dict(id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
                    model=config.model_name)
        if g.stream:
            return StreamingResponse(stream(request, g, reqs, queues, head, chat, turn, keep),
                                     media_type="text/event-stream")
        try:
            await wait_all(request, reqs, queues)
        except BaseException:
            for q in reqs:
                q.cancel()
            if keep:
                store.release(turn.conversation_id)
            raise
        info = finish(g, reqs, turn, keep)
        choices = []
        for i, q in enumerate(reqs):
            c = {"index": i, "finish_reason": info["finish"][i]}
            if chat:
                c["message"] = {"role": "assistant", "content": info["texts"][i]}
            else:
                c.update(text=info["texts"][i], logprobs=None)
            choices.append(c)
        return {**head, "choices": choices, "usage": info["usage"], "rewire": info["rewire"]}

    async def wait_all(request, reqs, queues):
        """Wait for every request's ("done", req); a disconnected client cancels them (frees the rows)."""
        for q, events in zip(reqs, queues):
            while True:
                try:
                    kind, _ = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():   # nobody reads the answer
                        raise ApiError(499, "the client closed the request", code="client_closed_request")
                    continue
                if kind == "done":
                    break
            if q.error is not None:
                raise ApiError(500, f"generation failed: {type(q.error).__name__}: {q.error}", type="server_error",
                               code="generation_failed")

    def text_of(q: Request) -> str:
        text = tok.decode(q.tokens, skip_special_tokens=True)
        if q.stopped:
            at = _find_stop(text, q.stops)
            text = text[:at] if at >= 0 else text
        return text

    def finish(g: GenRequest, reqs, turn, keep) -> dict:
        """Texts, finish reasons, usage and the rewire object; a conversation's turn is committed."""
        texts = [text_of(q) for q in reqs]
        eos = set(model.config.eos_token_ids)
        finish = ["stop" if (q.stopped or (q.tokens and q.tokens[-1] in eos)) else "length" for q in reqs]
        n_prompt = sum(len(q.ids) for q in reqs)
        n_gen = sum(len(q.tokens) for q in reqs)
        phases = [[{k: p[k] for k in ("context_len", "loss_before", "loss_after")} for p in q.phases] for q in reqs]
        rw = {"enabled": reqs[0].opts is not None,
              "options": dataclasses.asdict(reqs[0].rewire) if reqs[0].opts is not None else None,
              "phases": phases[0], "conversation_id": None}
        if len(reqs) > 1:
            rw["choices"] = [{"index": i, "phases": p} for i, p in enumerate(phases)]
        if turn is not None and keep:
            q = reqs[0]
            n = store.commit(turn, texts[0], q.tokens, q.phases, q.stopped, q.deltas_out, q.opt_out)
            rw.update(conversation_id=turn.conversation_id, conversation=turn.status, turn=n)
        return {"texts": texts, "finish": finish, "rewire": rw,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    async def stream(request, g: GenRequest, reqs, queues, head, chat, turn, keep):
        obj = "chat.completion.chunk" if chat else "text_completion"
        hold = max((len(s) for s in g.stops), default=1) - 1   # a stop string may be starting
        shown = [0] * len(reqs)

        def chunk(i, piece, finish=None, extra=None):
            if chat:
                delta = {"role": "assistant", "content": piece} if piece is not None else {}
                c = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": i, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({**head, "object": obj, "choices": [c], **(extra or {})}) + "\n\n"

        done = [False] * len(reqs)
        committed = False
        try:
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(i, events):
                while True:
                    item = await events.get()
                    await merged.put((i, item))
                    if item[0] == "done":
                        return
            tasks = [asyncio.create_task(pump(i, e)) for i, e in enumerate(queues)]
            while not all(done):
                i, (kind, x) = await merged.get()
                q = reqs[i]
                if kind == "tokens":
                    text = tok.decode(x, skip_special_tokens=True)
                    at = _find_stop(text, q.stops) if q.stops else -1
                    visible = text[:at] if at >= 0 else text[:max(0, len(text) - hold)]
                    visible = visible.rstrip("\ufffd")   # an incomplete UTF-8 character
                    if len(visible) > shown[i]:
                        yield chunk(i, visible[shown[i]:])
                        shown[i] = len(visible)
                    continue
                done[i] = True
                if q.error is not None:
                    err = ApiError(500, f"generation failed: {type(q.error).__name__}: {q.error}",
                                   type="server_error", code="generation_failed")
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    return
            info = finish(g, reqs, turn, keep)
            committed = True
            for i, q in enumerate(reqs):
                rest = info["texts"][i][shown[i]:]
                if rest:
                    yield chunk(i, rest)
                yield chunk(i, None, info["finish"][i], {"rewire": info["rewire"]} if i == len(reqs) - 1 else None)
            if g.include_usage:
                yield "data: " + json.dumps({**head, "object": obj, "choices": [], "usage": info["usage"]}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in locals().get("tasks", []):
                t.cancel()
            if not committed:   # the client went away (or it failed): free the rows; the conversation is unchanged
                for q in reqs:
                    q.cancel()
                if keep:
                    store.release(turn.conversation_id)

    return app
