"""Load generator for `rewire-jax serve`: N concurrent clients (the official `openai` client, streamed
requests) against a live server on 127.0.0.1, baseline and rewired, compared with the same prompts
run offline through `generate_queue` (same batch size, greedy): the serving overhead as a ratio.

    python -m rewire_jax.bench.serve [--model DIR] [--clients 16] [--requests 64] [--max-tokens 64]
                                     [--batch-size 16] [--json OUT]

Each mode runs its workload `--warmup` times untimed through the server (compiling) and once
offline, then `--repeat` times timed, the server and offline runs alternating (on a shared machine
the load drifts: each pair sees about the same).
Reported, the median over the repeats: requests/s, generated tokens/s, p50 / p99 time to first token
and latency, offline tokens/s, and server / offline tokens/s (the median of the pairs' ratios).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def bench_prompts(tokenizer, n: int, max_tokens: int = 48) -> list[str]:
    """n prompts: the first lines of held-out standard-library functions (on every machine)."""
    from ..demo import corpus
    out = []
    for path in corpus.heldout_files():
        lines = corpus.read_text(path).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def ") and i + 2 < len(lines):
                text = "\n".join(lines[i:i + 2]) + "\n"
                ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
                out.append(tokenizer.decode(ids))
                if len(out) == n:
                    return out
    if not out:
        raise RuntimeError("no held-out standard-library functions found for prompts")
    return [out[i % len(out)] for i in range(n)]


def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "rewire_jax.cli", "serve", "--port", str(port), "--batch-size", str(args.batch_size),
           "--max-queue", str(max(args.requests, 1)), "--log-level", "error"]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_context:
        cmd += ["--max-context", str(args.max_context)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start in 600 s")


def run_clients(url: str, prompts: list[str], max_tokens: int, clients: int, rewire: bool) -> dict:
    """All prompts through `clients` concurrent streamed requests. -> timings and token counts."""
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    name = c.models.list().data[0].id

    def one(prompt):
        t0 = time.perf_counter()
        ttft, usage = None, None
        for ch in c.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={} if rewire else {"rewire": False}):
            if ttft is None and ch.choices and ch.choices[0].text:
                ttft = time.perf_counter() - t0
            if ch.usage is not None:
                usage = ch.usage
        lat = time.perf_counter() - t0
        return (ttft if ttft is not None else lat), lat, usage.completion_tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    ttft, lat, toks = (np.array(x) for x in zip(*res))
    return {"wall_s": wall, "requests": len(prompts), "tokens": int(toks.sum()),
            "requests_per_s": len(prompts) / wall, "tokens_per_s": float(toks.sum()) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "latency_p50": float(np.percentile(lat, 50)), "latency_p99": float(np.percentile(lat, 99))}


def run_offline(model, prompts: list[str], max_tokens: int, batch_size: int, rewire, warmup: bool = False) -> dict:
    from ..generation import generate_queue
    ids = [model.encode(p) for p in prompts]
    if warmup:
        generate_queue(model, ids, max_tokens, batch_size=batch_size, rewire=rewire)   # compiles
    t0 = time.perf_counter()
    q = generate_queue(model, ids, max_tokens, batch_size=batch_size, rewire=rewire)
    wall = time.perf_counter() - t0
    toks = sum(len(t) for t in q.tokens)
    return {"wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall}


def table(rows: list[dict]) -> str:
    out = ["| mode | requests/s | tokens/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | offline tokens/s | "
           "server / offline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, o = r["server"], r["offline"]
        out.append(f"| {r['mode']} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | {s['ttft_p50']:.2f} / "
                   f"{s['ttft_p99']:.2f} | {s['latency_p50']:.2f} / {s['latency_p99']:.2f} | {o['tokens_per_s']:.1f} | "
                   f"{r['ratio']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or hub id (default: the demo model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=None, help="the server's --max-context")
    p.add_argument("--modes", default="baseline,rewired")
    p.add_argument("--warmup", type=int, default=2, help="untimed server runs of the workload per mode before the timed ones")
    p.add_argument("--repeat", type=int, default=3, help="timed (server, offline) pairs per mode; medians reported")
    p.add_argument("--json", metavar="OUT", default=None)
    a = p.parse_args(argv)
    from ..api import load
    from ..demo import DEMO_MODEL
    from ..rewire import RewireOptions

    model = load(a.model or DEMO_MODEL)
    prompts = bench_prompts(model.tokenizer, a.requests)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"rewire-jax-bench-serve-{os.getpid()}.log"
    proc, url = start_server(a, log)
    rows = []
    try:
        for mode in a.modes.split(","):
            rewired = mode == "rewired"
            for _ in range(a.warmup):   # compiles (the arrival order, hence the programs, varies per run)
                run_clients(url, prompts, a.max_tokens, a.clients, rewired)
            ro = RewireOptions() if rewired else None
            run_offline(model, prompts, a.max_tokens, a.batch_size, ro, warmup=True)   # compiles
            pairs = []
            for _ in range(a.repeat):
                pairs.append((run_clients(url, prompts, a.max_tokens, a.clients, rewired),
                              run_offline(model, prompts, a.max_tokens, a.batch_size, ro)))
                print(f"{mode}: server {pairs[-1][0]['tokens_per_s']:.1f} tok/s, offline "
                      f"{pairs[-1][1]['tokens_per_s']:.1f} tok/s (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
            med = lambda runs: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            rows.append({"mode": mode, "server": med([p[0] for p in pairs]), "offline": med([p[1] for p in pairs]),
                         "ratio": float(np.median([p[0]["tokens_per_s"] / p[1]["tokens_per_s"] for p in pairs])),
                         "runs": [{"server": p[0], "offline": p[1]} for p in pairs]})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "load_average": os.getloadavg(), "command": "python -m rewire_jax.bench.serve " + " ".join(
                sys.argv[1:] if argv is None else argv), "model": a.model or "demo",
            "clients": a.clients, "requests": a.requests, "max_tokens": a.max_tokens, "batch_size": a.batch_size,
            "warmup": a.warmup, "repeat": a.repeat}
    print(f"{info['date']}; {info['machine']}; load average {' '.join(f'{x:.2f}' for x in info['load_average'])}")
    print(f"`{info['command']}`\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
