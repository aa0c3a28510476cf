"""Cold compile time against depth: rewired `generate` (2 phases) of tiny OLMoE-shaped models.

    python -m rewire_jax.bench.compile_time [--layers 8 32] [--json OUT]

Each depth runs in a fresh process (nothing cached), random weights (hidden 64, 4 heads, 8 experts
top-2, expert width 32, vocab 128), a 24-token prompt, 16 new tokens, interval 8 (2 phases), paper
defaults otherwise. Reports the first call's wall time (tracing + compiling + running), a warm
rerun, and the ratio of the deepest to the shallowest. Only public API is used, so the same script
measures any version of the library.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax, numpy as np
import rewire_jax
L = int(sys.argv[1])
cfg = rewire_jax.ModelConfig(model_type="olmoe", vocab_size=128, hidden_size=64, num_layers=L, num_heads=4,
                             num_kv_heads=4, head_dim=16, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, moe_layers=tuple(range(L)), qk_norm="flat",
                             max_position_embeddings=256)
model = rewire_jax.Model(cfg, rewire_jax.init_params(cfg, jax.random.key(0)))
prompt = list(range(3, 27))
opts = rewire_jax.RewireOptions(interval=8)
times = []
for _ in range(2):
    t0 = time.perf_counter()
    r = rewire_jax.generate(model, [prompt], 16, rewire=opts, eos_token_id=None)
    times.append(time.perf_counter() - t0)
print(json.dumps({"layers": L, "cold_s": times[0], "warm_s": times[1], "phases": len(r.phases)}))
'''


def measure(layers: int) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(layers)], capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"{layers} layers failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewire_jax.bench.compile_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    rows = []
    for n in a.layers:
        rows.append(measure(n))
        r = rows[-1]
        print(f"{r['layers']:>3} layers: cold {r['cold_s']:.2f} s, warm {r['warm_s'] * 1e3:.1f} ms "
              f"({r['phases']} phases)", flush=True)
    lo, hi = min(rows, key=lambda r: r["layers"]), max(rows, key=lambda r: r["layers"])
    ratio = hi["cold_s"] / lo["cold_s"]
    print(f"cold {hi['layers']} layers / {lo['layers']} layers = {ratio:.2f}x (target <= 1.5x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "ratio": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
