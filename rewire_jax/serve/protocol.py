"""OpenAI's request fields, checked: every bad value is an `ApiError` (a 4xx with OpenAI's error
object `{"error": {"message", "type", "param", "code"}}`) that names the field and the fix.

Supported: model, prompt (completions: a string, token ids, or a list of either), messages (chat:
system / user / assistant, content a string or text parts), max_tokens (max_completion_tokens),
temperature, top_p, seed, stop, stream (+ stream_options.include_usage), n = 1, and the extensions
`rewire` (RewireOptions fields, or false) and `conversation_id` (chat). Unsupported features with a
non-default value (logprobs, echo, best_of > 1, penalties, logit_bias, tools, ...) are a 400.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from ..generation import Sampling
from ..rewire import RewireOptions

ROLES = ("system", "user", "assistant", "developer")
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: features this server does not implement: accepted only at these (OpenAI's default) values
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None,), "suffix": (None, ""), "tools": (None,), "tool_choice": (None, "none"),
               "functions": (None,), "function_call": (None,), "response_format": (None,)}
COMPLETIONS_DEFAULT_MAX = 16     # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX = 256           # chat: OpenAI's default is "up to the context"; capped here


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {...}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class GenRequest:
    """A checked request: what to generate and how."""

    prompts: list                    # completions: token-id lists (one per choice); chat: [] until templated
    messages: Optional[list]         # chat messages ({"role", "content": str})
    max_tokens: Optional[int]        # None: the endpoint's default
    sampling: Sampling
    seed: Optional[int]
    stops: tuple
    stream: bool
    include_usage: bool
    rewire: Optional[RewireOptions]  # None: the model's own routing
    conversation_id: Optional[str]


def _typed(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got "
                            f"{type(v).__name__} {v!r:.60}", name, "invalid_type")
    return v


def parse_rewire(value, default: Optional[RewireOptions]) -> Optional[RewireOptions]:
    """`rewire`: absent / null / true -> the server's options; false -> None (baseline); an object ->
    the server's options (or the paper's, if the server runs the baseline) with those fields changed."""
    if value is None or value is True:
        return default
    if value is False:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, f"'rewire' must be an object of RewireOptions fields or false, got {value!r:.60}",
                       "rewire", "invalid_type")
    fields = {f.name: f for f in dataclasses.fields(RewireOptions)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown rewire field(s) {', '.join(map(repr, unknown))}; valid fields: "
                            f"{', '.join(sorted(fields))}", "rewire", "unknown_field")
    base = default or RewireOptions()
    for k, v in value.items():
        cur = getattr(base, k)
        kinds = (bool,) if isinstance(cur, bool) else (int,) if isinstance(cur, int) else \
            (int, float) if isinstance(cur, float) else (str,)
        if not isinstance(v, kinds) or (isinstance(v, bool) and not isinstance(cur, bool)):
            raise ApiError(400, f"rewire.{k} must be {kinds[-1].__name__}, got {v!r:.60}", f"rewire.{k}", "invalid_type")
    try:
        return base.replace(**value)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"rewire: {e}", "rewire", "invalid_value") from None


def _messages(body: dict) -> list:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", "messages",
                       "missing_field")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                       "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}",
                           f"messages[{i}].role", "invalid_value")
        c = m.get("content")
        if isinstance(c, list):   # text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise ApiError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    f"are supported", f"messages[{i}].content", "invalid_value")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise ApiError(400, f"messages[{i}].content must be a string (or text parts), got {type(c).__name__}",
                           f"messages[{i}].content", "invalid_type")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
    return out


def _prompts(body: dict, tokenizer, vocab_size: int) -> list:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required: a string, a list of token ids, or a list of either",
                       "prompt", "missing_field")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either",
                       "prompt", "invalid_type")
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            if tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
            ids = list(tokenizer.encode(x, add_special_tokens=False))
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            ids = x
            if any(t < 0 or t >= vocab_size for t in ids):
                raise ApiError(400, f"prompt[{i}]: token ids must be in [0, {vocab_size})", "prompt", "invalid_value")
        else:
            raise ApiError(400, f"prompt[{i}] must be a string or a list of token ids", "prompt", "invalid_type")
        if not ids:
            raise ApiError(400, f"prompt[{i}] is empty (it tokenizes to nothing): give some text", "prompt",
                           "invalid_value")
        out.append(list(ids))
    return out


def parse(body: Any, chat: bool, default_rewire: Optional[RewireOptions], tokenizer, vocab_size: int) -> GenRequest:
    """A request body (parsed JSON) -> GenRequest, or an ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    for name, allowed in UNSUPPORTED.items():
        v = body.get(name)
        if v not in allowed and not (isinstance(v, (dict, list)) and not v and None in allowed):
            if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
                continue
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out", name, "unsupported")
    n = _typed(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, f"n={n} is not supported: this server returns one choice per prompt; send n requests "
                            f"(with temperature > 0 for different samples)", "n", "unsupported")
    max_tokens = _typed(body, "max_tokens", (int,))
    if chat and max_tokens is None:
        max_tokens = _typed(body, "max_completion_tokens", (int,))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens", "invalid_value")
    temperature = float(_typed(body, "temperature", (int, float), 1.0, "a number"))
    top_p = float(_typed(body, "top_p", (int, float), 1.0, "a number"))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature", "invalid_value")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    seed = _typed(body, "seed", (int,))
    if seed is not None and not -2 ** 63 <= seed < 2 ** 63:
        raise ApiError(400, f"'seed' must be a 64-bit signed integer, got {seed}", "seed", "invalid_value")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is None:
        stops = ()
    if not isinstance(stops, (list, tuple)) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop",
                       "invalid_value")
    stream = _typed(body, "stream", (bool,), False)
    so = _typed(body, "stream_options", (dict,), {}, "an object")
    include_usage = bool(so.get("include_usage", False))
    rewire = parse_rewire(body.get("rewire"), default_rewire)
    cid = body.get("conversation_id")
    if cid is not None:
        if not chat:
            raise ApiError(400, "'conversation_id' needs /v1/chat/completions (a conversation is a message list)",
                           "conversation_id", "invalid_value")
        if not isinstance(cid, str) or not CONVERSATION_ID.match(cid):
            raise ApiError(400, "'conversation_id' must be 1-128 characters of letters, digits, '_', '-', '.' "
                                "(starting with a letter or digit)", "conversation_id", "invalid_value")
    messages = _messages(body) if chat else None
    prompts = [] if chat else _prompts(body, tokenizer, vocab_size)
    return GenRequest(prompts, messages, max_tokens, Sampling(temperature, 0, top_p), seed, tuple(stops), stream,
                      include_usage, rewire, cid)


def check_length(n_prompt: int, max_tokens: int, limit: int, param: str = "max_tokens") -> None:
    """A prompt of n_prompt tokens + max_tokens must fit in `limit` positions."""
    if n_prompt + max_tokens > limit:
        raise ApiError(400, f"this request needs {n_prompt} prompt tokens + max_tokens {max_tokens} = "
                            f"{n_prompt + max_tokens} positions, more than this server's maximum context of {limit}; "
                            f"lower max_tokens or shorten the prompt", param, "context_length_exceeded")
