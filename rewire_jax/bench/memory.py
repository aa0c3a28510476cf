"""Memory benchmarks (scripts, not tests: they write GBs and take minutes).

  python -m rewire_jax.bench.memory load  [--layers 2] [--dir DIR] [--json OUT]
      writes an OLMoE-1B-7B-shaped checkpoint (real widths: hidden 2048, 64 experts x 1024, vocab
      50304, 16 heads; `--layers` of its 16 layers) with random bf16 weights, shard by shard in the
      hub's layout (per-expert keys, one safetensors file per layer + index), then in fresh
      processes measures the peak host RSS above the process baseline (after imports) of
      `rewire_jax.load(dir, dtype="bfloat16")`, of `python -m convert dir out` and of loading its
      output, and the bytes per device of the loaded weights on an 8-device mesh (simulated CPU
      devices).
  python -m rewire_jax.bench.memory plan tests/fixtures/*.json
      weights per chip (bf16) of each config on a few meshes (no devices needed).
  python -m rewire_jax.bench.memory phase [--contexts 1024,2048,4096,8192] [--remat none,layer]
      the optimise phase's peak RSS above the loaded weights (one phase, batch 1, 5 steps, soft
      selection) on the benchmark's model (hidden 512, 8 layers, 32 experts, vocab 8192), each
      (context, remat) in a fresh process whose programs come from a persistent compilation cache
      filled by a first run (so the peak is the phase's, not the compiler's), with the final
      deltas compared across remat settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .models import OLMOE_1B_7B
from .perf import scratch_dir


def write_olmoe(out: Path, layers: int, seed: int = 0) -> int:
    """Random bf16 OLMoE-1B-7B-shaped checkpoint in the hub layout, one file per layer (written and
    freed one at a time). -> bytes of weights."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    cfg = {**OLMOE_1B_7B, "num_hidden_layers": layers}
    d, I, E, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0

    def rnd(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def save(name, tensors):
        nonlocal total
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes

    n_files = layers + 1
    save(f"model-00001-of-{n_files:05d}.safetensors",
         {"model.embed_tokens.weight": rnd(V, d), "lm_head.weight": rnd(V, d),
          "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
             p + "post_attention_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
             p + "self_attn.q_norm.weight": np.ones(d, ml_dtypes.bfloat16),
             p + "self_attn.k_norm.weight": np.ones(d, ml_dtypes.bfloat16),
             p + "mlp.gate.weight": rnd(E, d)}
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = rnd(d, d)
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(I, d)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(I, d)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(d, I)
        save(f"model-{i + 2:05d}-of-{n_files:05d}.safetensors", t)
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return total


#: run in a fresh process: baseline RSS after imports, then the action, then the peak (ru_maxrss)
_PROBE = r"""
import gc, json, os, resource, sys, threading, time
import psutil
proc = psutil.Process()
import jax, numpy as np, rewire_jax
from rewire_jax.io import convert as C
gc.collect()
base = proc.memory_info().rss
peak = [base]
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=watch, daemon=True); t.start()
what, src, out, mesh = sys.argv[1:5]
res = {}
if what == "load":
    m = rewire_jax.load(src, dtype="bfloat16", mesh=None if mesh == "-" else mesh)
    jax.block_until_ready(m.params)
    leaves = jax.tree.leaves(m.params)
    res["weights_bytes"] = int(sum(a.nbytes for a in leaves))
    d0 = jax.devices()[0]
    res["device0_bytes"] = int(sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == d0))
    res["devices"] = len(jax.devices())
else:
    C.to_converted(src, out, dtype="bfloat16", progress=False)
stop = True; t.join()
peak_rss = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
res.update(baseline_rss=base, peak_rss=peak_rss, peak_above_baseline=peak_rss - base)
print(json.dumps(res))
"""


def _probe(what, src, out="-", mesh="-", devices=1):
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    p = subprocess.run([sys.executable, "-c", _PROBE, what, str(src), str(out), mesh], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_load(a):
    root = Path(a.dir or scratch_dir("rewire_mem_"))   # --dir keeps the checkpoint for the next run
    src = root / f"olmoe-1b-7b-{a.layers}layers"
    if not (src / "config.json").exists():
        t = time.time()
        total = write_olmoe(src, a.layers)
        print(f"wrote {src}: {total / 1e9:.2f} GB bf16 in {time.time() - t:.0f} s", flush=True)
    total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    res = {"layers": a.layers, "weights_bytes_on_disk": total}
    r = _probe("load", src)
    res["load"] = {**r, "ratio": r["peak_above_baseline"] / total}
    print(f"load (1 device): peak RSS above baseline {r['peak_above_baseline'] / 1e9:.2f} GB = "
          f"{res['load']['ratio']:.3f}x the weights' {total / 1e9:.2f} GB", flush=True)
    out = root / "converted"
    if out.exists():
        import shutil
        shutil.rmtree(out)
    r = _probe("convert", src, out)
    res["convert"] = {**r, "ratio": r["peak_above_baseline"] / total}
    print(f"convert: peak RSS above baseline {r['peak_above_baseline'] / 1e9:.2f} GB = {res['convert']['ratio']:.3f}x",
          flush=True)
    r = _probe("load", out)
    res["load converted"] = {**r, "ratio": r["peak_above_baseline"] / total}
    print(f"load the converted checkpoint (1 device): peak RSS above baseline "
          f"{r['peak_above_baseline'] / 1e9:.2f} GB = {res['load converted']['ratio']:.3f}x", flush=True)
    for mesh in a.meshes.split(";"):
        r = _probe("load", src, mesh=mesh, devices=8)
        res[f"load mesh {mesh}"] = {**r, "device0_fraction": r["device0_bytes"] / r["weights_bytes"],
                                    "ratio": r["peak_above_baseline"] / total}
        print(f"load on 8 devices, mesh {mesh}: device 0 holds {r['device0_bytes'] / 1e9:.3f} GB = "
              f"{r['device0_bytes'] / r['weights_bytes']:.3f} of the weights; peak RSS above baseline "
              f"{r['peak_above_baseline'] / 1e9:.2f} GB", flush=True)
    return res


_PHASE = r"""
import gc, json, resource, sys, threading, time
import psutil
proc = psutil.Process()
import jax, jax.numpy as jnp, numpy as np
import rewire_jax
from rewire_jax.rewire import RewireOptions
from rewire_jax.rewire.cycle import run_phase, start_cycle
src, T, remat = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_compilation_cache_dir", sys.argv[5])   # 2nd run: no compiler memory in the peak
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
model = rewire_jax.load(src, remat=remat)
cfg = model.config.replace(max_position_embeddings=max(T, model.config.max_position_embeddings))
jax.block_until_ready(model.params)
gc.collect()
base = proc.memory_info().rss
peak = [base]; stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
th = threading.Thread(target=watch, daemon=True); th.start()
opts = RewireOptions()
tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, T))
state = start_cycle(cfg, opts, 1)
t0 = time.time()
state, out = run_phase(model.params, state, tokens, [T], cfg, opts)
d = np.asarray(out.deltas)
secs = time.time() - t0
stop = True; th.join()
np.save(sys.argv[4], d)
print(json.dumps({"context": T, "remat": remat, "peak_above_weights": max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base,
                  "seconds_incl_compile": secs}))
"""


def bench_phase(a):
    import numpy as np
    from .models import Shape, build_hf
    root = Path(a.dir or scratch_dir("rewire_phase_"))
    src = root / "bench_model"
    if not (src / "config.json").exists():
        build_hf(Shape()).save_pretrained(src)
    rows = []
    for T in [int(t) for t in a.contexts.split(",")]:
        ref = None
        for remat in a.remat.split(","):
            dfile = root / f"deltas_{T}_{remat}.npy"
            cache = root / "xla_cache"
            for _ in range(2):   # the first run fills the compilation cache, the second is measured
                p = subprocess.run([sys.executable, "-c", _PHASE, str(src), str(T), remat, str(dfile), str(cache)],
                                   capture_output=True, text=True, timeout=a.timeout)
                if p.returncode:
                    break
            if p.returncode:
                rows.append({"context": T, "remat": remat, "error": p.stderr[-500:]})
                print(rows[-1], flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            d = np.load(dfile)
            if ref is None:
                ref = d
            r["deltas_diff_vs_first"] = float(np.abs(d - ref).max())
            rows.append(r)
            print(f"context {T:6d} remat={remat:5s}: peak {r['peak_above_weights'] / 1e9:.2f} GB above the weights, "
                  f"{r['seconds_incl_compile']:.1f} s (incl. compile), deltas diff {r['deltas_diff_vs_first']:.1e}",
                  flush=True)
    return rows


def plan(a):
    """Weights per chip (bf16) of the seed models on the meshes of docs/scaling.md, from their config.json."""
    from ..io import families
    from ..model import sharding
    rows = []
    for path in a.configs:
        cfg = families.from_hf(json.loads(Path(path).read_text()), dtype="bfloat16")
        row = {"model": Path(path).stem, "total_GB": sharding.bytes_per_device(cfg, {}) / 1e9}
        for spec in a.meshes.split(";"):
            row[spec] = sharding.bytes_per_device(cfg, sharding.parse_mesh(spec)) / 1e9
        rows.append(row)
        print(" | ".join([row["model"], f"{row['total_GB']:.1f}"] +
                         [f"{spec}: {row[spec]:.2f} GB" for spec in a.meshes.split(";")]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.memory")
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("load")
    lo.add_argument("--layers", type=int, default=2)
    lo.add_argument("--meshes", default="fsdp=8;expert=4,tensor=2")
    ph = sub.add_parser("phase")
    ph.add_argument("--contexts", default="1024,2048,4096,8192")
    ph.add_argument("--remat", default="none,layer")
    ph.add_argument("--timeout", type=int, default=3600)
    pl = sub.add_parser("plan")
    pl.add_argument("configs", nargs="+", help="config.json files (e.g. tests/fixtures/*.json)")
    pl.add_argument("--meshes", default="expert=4;expert=8;fsdp=4;fsdp=8;expert=4,tensor=2")
    for s in (lo, ph, pl):
        s.add_argument("--dir", default=None)
        s.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = {"load": bench_load, "phase": bench_phase, "plan": plan}[a.what](a)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
