"""Throughput of the harness: samples/s at batch 1 vs batch B, rewired (or baseline), on HumanEval.

    python -m rewire_jax.eval.bench [--model DIR] [--problems 16] [--batch 16] [--max-new-tokens 64]
                                    [--interval 32] [--baseline] [--json OUT]

Each configuration runs the same problems twice: the first pass compiles (reported apart), the
second is timed. A sample = generate (lock-step batch, each row its own deltas) + sandboxed tests.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _pass(model, task, probs, batch, opts, budget, backend):
    from rewire_jax import Sampling

    from . import backend as B

    t0 = time.perf_counter()
    gen = 0.0
    for j in range(0, len(probs), batch):
        chunk = probs[j:j + batch]
        reqs = [B.Request(tuple(B.encode_prompt(model, task.prompt(p), False)), budget, task.stops) for p in chunk]
        t1 = time.perf_counter()
        outs = backend(reqs, rewire=opts, sampling=Sampling(), seed=0)
        gen += time.perf_counter() - t1
        task.score(chunk, [o.text for o in outs])
    return time.perf_counter() - t0, gen


def main(argv=None) -> int:
    from rewire_jax import RewireOptions, load
    from rewire_jax.demo import DEMO_MODEL

    from . import backend as B
    from .tasks import get_task

    p = argparse.ArgumentParser(prog="python -m rewire_jax.eval.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--interval", type=int, default=32)
    p.add_argument("--baseline", action="store_true", help="no rewiring")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = load(a.model)
    task = get_task("humaneval")
    probs = task.load(limit=a.problems)
    opts = None if a.baseline else RewireOptions(interval=a.interval)
    backend = B.generate_backend(model)
    rows = {}
    for batch in (1, a.batch):
        cold, _ = _pass(model, task, probs, batch, opts, a.max_new_tokens, backend)
        warm, gen = _pass(model, task, probs, batch, opts, a.max_new_tokens, backend)
        rows[batch] = {"samples_per_s": len(probs) / warm, "seconds": warm, "generate_seconds": gen,
                       "compile_seconds": max(0.0, cold - warm)}
        print(f"batch {batch:>3}: {len(probs)} samples in {warm:.2f}s = {len(probs) / warm:.3f} samples/s "
              f"(generate {gen:.2f}s; first pass +{cold - warm:.1f}s compile)", flush=True)
    speedup = rows[a.batch]["samples_per_s"] / rows[1]["samples_per_s"]
    print(f"batch {a.batch} vs 1: {speedup:.2f}x ({'baseline' if a.baseline else 'rewired'}, "
          f"{a.max_new_tokens} new tokens, interval {a.interval}, load average {os.getloadavg()[0]:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "speedup": speedup, "loadavg": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
