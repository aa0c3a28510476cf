"""`rewire-jax serve` against a live server on 127.0.0.1 (one subprocess on the demo model, reused by
every test; the last test kills it and restarts one on the same --state-dir), driven by the official
`openai` client: greedy replies equal `rewire_jax.generate` / `Conversation` in process, streamed
pieces join to the whole text, concurrent requests each get their own result, bad input gets its
4xx and the server keeps serving."""
import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import rewire_jax  # noqa: E402
from conversation_helpers import TEMPLATE  # noqa: E402
from rewire_jax import Conversation, RewireOptions  # noqa: E402

NEW = 8
# a phase on each prompt (none mid-reply: interval = NEW; the queue's tests cover those): every
# optimisation phase program is compiled per context bucket and sub-batch size, the tests' main cost
OPTS = RewireOptions(interval=NEW, steps=2)
NAME = "rewire-jax-demo"
KEY = "test-key"
ROOT = Path(__file__).parent.parent
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "# parse the header\n",
           "def main():\n    ", "x = [", "while True:", "try:\n    import", "return self.", "if __name__ ==",
           "with open(path) as f:", "def __init__(self", "raise ValueError(", "lambda x:", "print("]
SAMPLED, SEEDS = rewire_jax.Sampling(1.0, 0, 0.9), (7, 8)   # the sampled requests: temperature 1, top_p 0.9
TURNS = ["def f", "more", "again"]   # short: three turns' contexts fit in the buckets 16, 32, 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `rewire-jax serve` subprocess on a free loopback port."""

    def __init__(self, tmp: Path, *extra: str):
        self.tmp, self.state_dir, self.port = tmp, tmp / "states", _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w")
        cmd = [sys.executable, "-m", "rewire_jax.cli", "serve", "--port", str(self.port), "--batch-size", "2",
               "--max-context", "128", "--interval", str(NEW), "--steps", "2", "--dispatch", "dense", "--state-dir", str(self.state_dir), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.output()[-3000:]}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"the server did not answer /health in 240 s: {self.output()[-3000:]}")

    def client(self, key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def get(url: str, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
        return r.status, json.loads(r.read())


def post(url: str, body, headers=None):
    """-> (status, parsed JSON) for a raw body (bytes) or a JSON-able object, 4xx included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    box = {"server": Server(tmp_path_factory.mktemp("serve"))}
    yield box
    rc = box["server"].stop(signal.SIGTERM)
    assert rc == 0, f"SIGTERM: the server did not drain and exit cleanly ({rc})"


@pytest.fixture(scope="module")
def model():
    """The demo model as the server runs it (--dispatch dense: the quickest programs to compile)."""
    return rewire_jax.load(ROOT / "rewire_jax" / "demo" / "model", dispatch="dense")


@pytest.fixture(scope="module")
def offline(model):
    """Every prompt's greedy reply in process, each alone (rewired; two baseline). cache_len=128 as
    the server's rows: its one-row phase and prefill programs are then these (the compile cache)."""
    ids = [model.encode(p) for p in PROMPTS]
    text = lambda r: model.tokenizer.decode(r.tokens[0], skip_special_tokens=True)
    return {"rewired": [text(rewire_jax.generate(model, [p], NEW, rewire=OPTS, cache_len=128)) for p in ids],
            "baseline": [text(rewire_jax.generate(model, [p], n, cache_len=128)) for p, n in zip(ids[:2], (NEW, 24))],
            "sampled": [text(rewire_jax.generate(model, [p], NEW, rewire=OPTS, cache_len=128, sampling=SAMPLED, seed=s))
                        for p, s in zip(ids[:2], SEEDS)]}


@pytest.fixture(scope="module")
def conversation(model):
    """TURNS through `Conversation` in process: the replies the server must give."""
    conv = Conversation(model, OPTS, chat_template=TEMPLATE)
    return [conv.reply(t, NEW).text for t in TURNS]


def test_models_and_health(server):
    s = server["server"]
    assert [m.id for m in s.client().models.list().data] == [NAME]
    status, h = get(s.url + "/health")
    assert status == 200 and h["status"] == "ok" and h["batch_size"] == 2


def test_completions_equal_generate_and_stream_joins(server, offline):
    c = server["server"].client()
    r = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == offline["rewired"][0]
    assert r.usage.completion_tokens <= NEW and r.usage.prompt_tokens > 0
    rw = r.model_extra["rewire"]
    assert rw["enabled"] and rw["phases"][0]["context_len"] == r.usage.prompt_tokens
    pieces = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=NEW,
                                                                  temperature=0, stream=True)]
    assert "".join(pieces) == offline["rewired"][0]
    # the baseline, 24 tokens: more than one decode call (16 steps each), so more than one piece
    base = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                extra_body={"rewire": False})
    assert base.choices[0].text == offline["baseline"][1] and base.model_extra["rewire"]["phases"] == []
    pieces = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24,
                                                                  temperature=0, stream=True,
                                                                  extra_body={"rewire": False})]
    assert "".join(pieces) == offline["baseline"][1] and len([p for p in pieces if p]) >= 2


def test_stop_string_cuts_the_text(server, offline):
    c = server["server"].client()
    full = offline["rewired"][2]
    stop = next(ch for ch in full[len(full) // 2:] if not ch.isspace())   # a character past the middle
    r = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=NEW, temperature=0, stop=[stop],
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_chat_equals_conversation_streamed_and_not(server, conversation):
    c = server["server"].client()
    msgs = [{"role": "user", "content": TURNS[0]}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == conversation[0]
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=NEW, temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == conversation[0]


def _sampled(c, i: int):
    return c.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=NEW, temperature=SAMPLED.temperature,
                                top_p=SAMPLED.top_p, seed=SEEDS[i])


def test_16_concurrent_greedy_requests(server, offline):
    """16 greedy requests at once through 2 rows, with 2 sampled ones (with `seed`) among them (rows
    of another sampling setting share the batch, not a decode call): each greedy one answered once
    and equal to its offline result; each sampled one equal to `generate` with its seed alone, and to
    the same request sent alone (each row samples from its own key)."""
    c = server["server"].client()
    alone = _sampled(c, 0)
    assert alone.choices[0].text == offline["sampled"][0]

    def one(i):
        if i >= 16:   # sampled
            r = _sampled(c, i - 16)
            return i, r.id, (r.usage.completion_tokens, r.choices[0].text)
        r = c.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=NEW, temperature=0)
        return i, r.id, r.choices[0].text

    with cf.ThreadPoolExecutor(18) as pool:
        got = [f.result(timeout=240) for f in [pool.submit(one, i) for i in range(18)]]
    assert sorted(i for i, _, _ in got) == list(range(18))
    assert len({rid for _, rid, _ in got}) == 18
    for i, _, text in got:
        if i < 16:
            assert text == offline["rewired"][i], f"request {i}"
        else:
            n, text = text
            assert 1 <= n <= NEW and text == offline["sampled"][i - 16], f"sampled request {i}"


def _turns(s: "Server", cid: str, upto: int, replies: list, key: str = "unused") -> list:
    """Send TURNS[:upto] as chat requests of one conversation (the whole message list each time)."""
    c, msgs, out = s.client(key), [], []
    for i in range(len(replies), upto):
        msgs = [m for t, a in zip(TURNS, replies) for m in ({"role": "user", "content": t},
                                                             {"role": "assistant", "content": a})]
        msgs.append({"role": "user", "content": TURNS[i]})
        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=NEW, temperature=0,
                                      extra_body={"conversation_id": cid})
        replies.append(r.choices[0].message.content)
        out.append(r.model_extra["rewire"])
    return out


def test_conversation_three_turns_equal_in_process(server, conversation):
    s = server["server"]
    replies = []
    rw = _turns(s, "conv-a", 3, replies)
    assert replies == conversation
    assert [x["conversation"] for x in rw] == ["new", "continued", "continued"] and rw[-1]["turn"] == 3
    assert (s.state_dir / "conv-a" / "state.json").is_file()
    # an edited history resets the state, and says so
    r = s.client().chat.completions.create(
        model=NAME, max_tokens=NEW, temperature=0, extra_body={"conversation_id": "conv-a"},
        messages=[{"role": "user", "content": "edited"}, {"role": "assistant", "content": "x"},
                  {"role": "user", "content": TURNS[2]}])
    assert r.model_extra["rewire"]["conversation"] == "reset"


BAD = [  # (endpoint, body, status, param or code)
    ("completions", b"{not json", 400, "invalid_json"),
    ("completions", {"model": NAME}, 400, "prompt"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
    ("completions", {"model": NAME, "prompt": 42}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 10 ** 9}, 400, "context_length_exceeded"),
    ("completions", {"model": NAME, "prompt": "x " * 200, "max_tokens": 4}, 400, "context_length_exceeded"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
    ("completions", {"model": NAME, "prompt": "x", "rewire": {"learning_rate": 1}}, 400, "unknown_field"),
    ("completions", {"model": NAME, "prompt": "x", "rewire": {"steps": 0}}, 400, "rewire"),
    ("completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
]


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server):
    s = server["server"]
    for endpoint, body, status, what in BAD:
        got, err = post(f"{s.url}/v1/{endpoint}", body)
        assert got == status, (body, err)
        e = err["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        assert what in (e["param"], e["code"]), (body, e)
    with pytest.raises(openai.BadRequestError, match="unknown rewire field"):
        s.client().completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"rewire": {"nope": 1}})
    assert get(s.url + "/health")[0] == 200


def _wait_until(cond, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.05)


def test_client_disconnect_frees_its_row(server):
    """A client that goes away mid-stream, and one that leaves before its (non-streamed) response,
    each free their row at the next decode boundary: /health's active rows drop to 0 and its count of
    cancelled requests grows by 2, long before the 100 tokens asked for (a phase every 8) are made.
    Then the next request is served."""
    s = server["server"]
    health = lambda: get(s.url + "/health")[1]
    before = health()["cancelled"]
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
    head = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), head)
    resp = conn.getresponse()
    assert resp.status == 200
    while not resp.fp.readline().startswith(b"data: {"):   # the first piece: it is generating
        pass
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_until(lambda: health()["active"] == 0, what="the streamed request's row to be freed")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), head)
    _wait_until(lambda: health()["active"] == 1, what="the request to take a row")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_until(lambda: health()["active"] == 0, what="the non-streamed request's row to be freed")
    assert health()["cancelled"] == before + 2
    r = s.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_non_loopback_bind_without_api_key_refuses(capsys):
    """(in process: the CLI refuses before loading anything)"""
    from rewire_jax import cli
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2 and "--api-key" in capsys.readouterr().err


def test_sigkill_after_two_turns_restart_continues(server, conversation, tmp_path):
    """Two turns, SIGKILL, a new server on the same --state-dir (with --api-key, a waiting list of 1):
    the third reply is the in-process one. Then: a bad key is a 401, a full queue a 429."""
    s = server["server"]
    replies = []
    _turns(s, "conv-k", 2, replies)
    s.stop(signal.SIGKILL)
    s2 = server["server"] = Server(s.tmp, "--api-key", KEY, "--max-queue", "1")
    assert _turns(s2, "conv-k", 3, replies, key=KEY)[-1]["conversation"] == "continued"
    assert replies == conversation
    status, err = post(f"{s2.url}/v1/completions", {"model": NAME, "prompt": "x"}, {"Authorization": "Bearer no"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        s2.client("wrong").models.list()
    # 16 requests at once on 2 rows and a waiting list of 1: some are turned away at once
    # (baseline: no phase programs to compile at the contexts they reach)
    c = s2.client(KEY)

    def one(i):
        try:
            return len(c.completions.create(model=NAME, prompt=PROMPTS[i % 16], max_tokens=24, temperature=0,
                                            extra_body={"rewire": False}).choices)
        except openai.RateLimitError:
            return 429

    with cf.ThreadPoolExecutor(16) as pool:
        got = [f.result(timeout=240) for f in [pool.submit(one, i) for i in range(16)]]
    assert 429 in got and 1 in got and set(got) <= {1, 429}
    assert get(s2.url + "/health")[0] == 200


def test_sigterm_drains_the_turn_in_flight(server):
    """SIGTERM with a conversation turn in flight (the restarted server): /health says draining and a
    new request gets a 503 while the turn finishes; the turn is answered and its state written; the
    process exits 0."""
    s = server["server"]
    c = s.client(KEY)
    health = lambda: get(s.url + "/health")[1]
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: c.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": TURNS[0]}], max_tokens=40, temperature=0,
            extra_body={"conversation_id": "conv-t"}))
        _wait_until(lambda: health()["active"] == 1, what="the turn to take a row")
        s.proc.send_signal(signal.SIGTERM)
        _wait_until(lambda: health()["status"] == "draining", what="the server to drain")
        status, err = post(f"{s.url}/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2},
                           {"Authorization": f"Bearer {KEY}"})
        assert status == 503 and err["error"]["code"] == "shutting_down"
        r = fut.result(timeout=240)
    assert r.choices[0].message.content and r.model_extra["rewire"]["turn"] == 1
    assert (s.state_dir / "conv-t" / "state.json").is_file()
    assert s.proc.wait(120) == 0
