"""The batch table: throughput of batched generation, and the queue against lock-step batches.

    python -m rewire_jax.bench.batch                       # demo model + OLMoE-shaped model
    python -m rewire_jax.bench --batch-table               # the same, after the main benchmark
    python -m rewire_jax.bench.batch --models demo --batches 1 4 16 --queue-prompts 64

Per model and batch size B (B distinct prompts of 64-184 tokens, `--new-tokens` each, warm: every
row is timed after a first run, compile time apart): rewire_jax baseline and rewired (paper
defaults) `generate`, total new tokens per second and the optimise / prefill / decode split of the
best of `--warm-runs` warm runs (default 2; HF's row is a best of runs too); HF `generate` on the
same prompts (left-padded batch; `--skip-hf` skips it); the distinct experts hit per MoE layer per
decode step (mean over steps and layers) next to the timings; and the decode
roofline: the bytes a step must read (weights other than the embedding table, the distinct experts
hit, each row's KV over its context) at the memory bandwidth measured in the same run, i.e. the
tokens/s a memory-bound decode cannot exceed, and so the largest batch-B / batch-1 ratio possible.

Routing like real text: the demo model continues real code (held-out stdlib modules) greedily,
so its decode routes as on text; a random-weight model's greedy continuation collapses into a
repeated token (decode would keep hitting the same few experts, flattering a memory-bound step),
so the OLMoE-shaped model samples at temperature 1 (seeded; HF generate samples too: same count of
tokens, not the same tokens) and the distinct-experts column shows what decode touched.

Queue: `--queue-prompts` prompts of mixed lengths (64-184) and mixed max lengths (16 to
`--new-tokens`), through `generate_queue` with `--queue-batch` rows, against lock-step `generate`
batches of the same size (each batch runs to its longest budget, rows cut at their own): useful
tokens per second of both and the fraction of row-steps lock-step leaves idle.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _load(name: str, seed: int = 0):
    import rewire_jax
    if name == "demo":
        from rewire_jax.demo import DEMO_MODEL
        return rewire_jax.load(DEMO_MODEL), str(DEMO_MODEL)
    from .models import Shape, build_hf
    hf = build_hf(Shape(), seed)
    from .perf import scratch_dir
    d = scratch_dir("rewire_batch_")
    hf.save_pretrained(d)
    return rewire_jax.load(d), d


def _prompts(model, name: str, n: int, seed: int = 0, lo: int = 64, hi: int = 184) -> list[list[int]]:
    """n distinct prompts of lo..hi tokens: held-out stdlib code for the demo model, random ids else."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, n)
    if name == "demo":
        from rewire_jax.demo import corpus
        ids = []
        for f in corpus.heldout_files():
            ids += model.encode(corpus.read_text(f))
        ids = np.asarray(ids)
        starts = rng.choice(len(ids) - hi, n, replace=False)
        return [ids[s:s + L].tolist() for s, L in zip(starts, lens)]
    return [rng.integers(3, model.config.vocab_size, L).tolist() for L in lens]


def distinct_experts(model, prompts, tokens) -> float:
    """Mean over decode steps and MoE layers of the number of distinct experts the batch's rows hit
    at that step (teacher-forced forward of prompt + generated tokens; step s feeds token s)."""
    import jax.numpy as jnp
    import rewire_jax
    B = len(prompts)
    seqs = [list(p) + list(t) for p, t in zip(prompts, tokens)]
    T = max(len(s) for s in seqs)
    buf = np.zeros((B, T), np.int32)
    for b, s in enumerate(seqs):
        buf[b, :len(s)] = s
    # one right-padded batch (causal: padding after a row's end changes nothing before it), in
    # chunks of 16 rows; one compile per chunk shape
    idx = []
    for b0 in range(0, B, 16):
        _, aux = rewire_jax.forward(model.params, jnp.asarray(buf[b0:b0 + 16]),
                                    jnp.zeros((min(16, B - b0), *model.config.delta_shape)), model.config)
        idx += list(np.asarray(aux["idx"]))        # [L_moe, T, k] per row
    steps = min(len(t) for t in tokens) - 1
    counts = []
    for s in range(steps):
        for l in range(model.config.num_moe_layers):
            counts.append(len({int(e) for b in range(B) for e in idx[b][l, len(prompts[b]) + s]}))
    return float(np.mean(counts)) if counts else float("nan")


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache per context token per row, all layers (from the prefill's cache layout)."""
    import jax
    import jax.numpy as jnp
    from rewire_jax.generation.decode import prefill
    cfg = model.config
    toks = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    lens = jax.ShapeDtypeStruct((1,), jnp.int32)
    deltas = jax.ShapeDtypeStruct((1, *cfg.delta_shape), jnp.float32)
    _, cache, _ = jax.eval_shape(lambda p, t, l, d: prefill(p, t, l, d, cfg, 16), model.params, toks, lens, deltas)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) // 16


def decode_step_bytes(model, distinct: float, mean_context: float, batch: int) -> dict:
    """The bytes one decode step must read at least: every weight but the embedding table and the
    routed experts (attention, routers, norms, shared experts, LM head), `distinct` routed experts per
    MoE layer, and each row's KV cache over its context (a lower bound: static shapes read the
    window bucket, not the exact context)."""
    import jax
    from rewire_jax.model.weights import Weight, declarations
    cfg = model.config
    flat = jax.tree_util.tree_flatten_with_path(declarations(cfg), is_leaf=lambda x: isinstance(x, Weight))[0]
    dense = expert = 0
    for (path, w), leaf in zip(flat, jax.tree.leaves(model.params)):
        name = jax.tree_util.keystr(path)
        nbytes = leaf.size * leaf.dtype.itemsize
        if "experts" in w.axes[:-1]:    # routed experts [.., E, ..] (the router's E is its last axis)
            expert += nbytes            # all routed experts of all MoE layers
        elif "embed" not in name or cfg.tie_word_embeddings:
            dense += nbytes
    per_expert_layer = expert / (cfg.num_experts * cfg.num_moe_layers)
    weights = dense + distinct * cfg.num_moe_layers * per_expert_layer
    kv = batch * mean_context * kv_bytes_per_token(model)
    return {"weights": float(weights), "kv": float(kv), "total": float(weights + kv)}


def stream_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s XLA reads on this machine: a jitted sum over an `mb` MB fp32 array, best of `repeats`."""
    import jax
    import jax.numpy as jnp
    from .perf import _timed
    x = jnp.ones((mb << 18,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
    return x.nbytes / best


def hf_batch(path: str, prompts, n: int, sample: bool, seed: int = 0) -> float:
    """HF generate on the batch (left padding), n new tokens per row -> seconds (warm: second run)."""
    import torch
    import transformers
    torch.set_flush_denormal(True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=sample, eos_token_id=None, pad_token_id=0)
    if sample:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    best = None
    threads = torch.get_num_threads()
    try:   # on a shared CPU torch's OpenMP threads can spin against other work: best of 1 and all threads
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            with torch.no_grad():
                for _ in range(2):
                    torch.manual_seed(seed)
                    t0 = time.perf_counter()
                    hf.generate(ids, attention_mask=mask, **kw)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
    finally:
        torch.set_num_threads(threads)
    return best


def model_rows(name: str, batches, n: int, skip_hf: bool, rewired_max: int, seed: int = 0,
               warm_runs: int = 2) -> list[dict]:
    if warm_runs < 1:
        raise ValueError(f"warm_runs (--warm-runs) must be >= 1, got {warm_runs}")
    import rewire_jax
    from rewire_jax import RewireOptions, Sampling
    model, path = _load(name, seed)
    sample = name != "demo"
    sampling = Sampling(1.0) if sample else Sampling()
    prompts_all = _prompts(model, name, max(batches), seed + 1)
    rows = []
    for B in batches:
        prompts = prompts_all[:B]
        row: dict = {"model": name, "batch": B, "new_tokens": n}
        for label, opts in (("baseline", None), ("rewired", RewireOptions())):
            if opts is not None and B > rewired_max:
                continue
            run = lambda: rewire_jax.generate(model, prompts, n, rewire=opts, sampling=sampling, seed=seed,
                                              eos_token_id=None)
            t0 = time.perf_counter()
            run()
            cold = time.perf_counter() - t0
            r = min((run() for _ in range(warm_runs)), key=lambda res: res.timing["total"])
            t = r.timing
            row[label] = {"tok_s": B * n / t["total"], "seconds": t["total"], "optimise": t["optimise"],
                          "prefill": t["prefill"], "decode": t["decode"], "decode_tok_s": B * n / t["decode"],
                          "compile": cold - t["total"]}
            if opts is None:
                row["distinct_experts"] = distinct_experts(model, prompts, r.tokens)
                row["top_k"] = model.config.num_experts_per_tok
                row["experts"] = model.config.num_experts
                mean_ctx = float(np.mean([len(p) for p in prompts])) + n / 2
                row["step_bytes"] = decode_step_bytes(model, row["distinct_experts"], mean_ctx, B)
            print(f"  {name} B={B} {label}: {row[label]['tok_s']:.0f} tok/s ({t['total']:.2f} s: optimise "
                  f"{t['optimise']:.2f} prefill {t['prefill']:.2f} decode {t['decode']:.2f})", flush=True)
        if not skip_hf:
            s = hf_batch(path, prompts, n, sample, seed)
            row["hf"] = {"tok_s": B * n / s, "seconds": s}
            print(f"  {name} B={B} HF generate: {B * n / s:.0f} tok/s ({s:.2f} s)", flush=True)
        rows.append(row)
    return rows


def queue_rows(name: str, n_prompts: int, batch: int, max_new: int, rewired: bool, seed: int = 0) -> dict:
    """generate_queue vs lock-step generate batches on n_prompts mixed prompts / budgets."""
    import rewire_jax
    from rewire_jax import RewireOptions
    model, _ = _load(name, seed)
    rng = np.random.default_rng(seed + 7)
    prompts = _prompts(model, name, n_prompts, seed + 3)
    budgets = rng.integers(16, max_new + 1, n_prompts).tolist()
    opts = RewireOptions() if rewired else None
    useful = int(sum(budgets))
    out = {"model": name, "prompts": n_prompts, "batch": batch, "rewired": rewired, "useful_tokens": useful}

    def lockstep():
        t0 = time.perf_counter()
        for i in range(0, n_prompts, batch):
            rewire_jax.generate(model, prompts[i:i + batch], max(budgets[i:i + batch]), rewire=opts,
                                eos_token_id=None)
        return time.perf_counter() - t0

    def queue():
        t0 = time.perf_counter()
        q = rewire_jax.generate_queue(model, prompts, budgets, batch_size=batch, rewire=opts, eos_token_id=None)
        return time.perf_counter() - t0, q

    # warm-up: both full runs once (the queue compiles a prefill per (context bucket, sub-batch size)
    # and a decode per window bucket: measured ~125 programs for 96 demo prompts, 280 s cold under
    # load against 9 s warm), then the timed runs
    t_lock_cold = lockstep()
    t_queue_cold, _ = queue()
    out.update(lockstep_cold_seconds=t_lock_cold, queue_cold_seconds=t_queue_cold)
    t_lock = lockstep()
    t_queue, q = queue()
    slots = sum(batch * max(budgets[i:i + batch]) for i in range(0, n_prompts, batch))
    out.update(lockstep_seconds=t_lock, queue_seconds=t_queue, lockstep_tok_s=useful / t_lock,
               queue_tok_s=useful / t_queue, lockstep_idle_fraction=1 - useful / slots,
               queue_idle_fraction=q.stats["idle_fraction"], queue_stats=q.stats,
               speedup=t_lock / t_queue, predicted_speedup=1 / (1 - (1 - useful / slots)))
    print(f"  queue {name} ({'rewired' if rewired else 'baseline'}, {n_prompts} prompts, batch {batch}): "
          f"lock-step {t_lock:.2f} s ({useful / t_lock:.0f} useful tok/s, idle {100 * (1 - useful / slots):.0f}% of "
          f"row-steps), queue {t_queue:.2f} s ({useful / t_queue:.0f} tok/s, idle "
          f"{100 * q.stats['idle_fraction']:.0f}%) = {t_lock / t_queue:.2f}x", flush=True)
    return out


def roofline(result: dict) -> None:
    """Each row's decode roofline: tokens/s if a step cost only its bytes at the measured bandwidth."""
    bw = result.get("bandwidth")
    for r in result["rows"]:
        if bw and "step_bytes" in r:
            r["roofline_decode_tok_s"] = r["batch"] * bw / r["step_bytes"]["total"]


def report(result: dict) -> None:
    roofline(result)
    print()
    print("| model | batch | baseline tok/s | decode tok/s | rewired tok/s | rewired: optimise / prefill / decode s "
          "| HF generate tok/s | baseline / HF | distinct experts per layer per step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        b, w, h = r.get("baseline"), r.get("rewired"), r.get("hf")
        print(f"| {r['model']} | {r['batch']} | {b['tok_s']:.0f} | {b['decode_tok_s']:.0f} | "
              + (f"{w['tok_s']:.0f} | {w['optimise']:.2f} / {w['prefill']:.2f} / {w['decode']:.2f}" if w else " | ")
              + (f" | {h['tok_s']:.0f} | {b['tok_s'] / h['tok_s']:.2f}x" if h else " |  | ")
              + f" | {r['distinct_experts']:.1f} of {r['experts']} (top-{r['top_k']}) |")
    by = {(r["model"], r["batch"]): r for r in result["rows"]}
    print()
    for m in sorted({r["model"] for r in result["rows"]}):
        one = by.get((m, 1))
        for B in sorted(b for (mm, b) in by if mm == m and b > 1):
            r = by[(m, B)]
            if not one:
                continue
            line = (f"{m}: batch {B} vs 1: baseline {r['baseline']['tok_s'] / one['baseline']['tok_s']:.2f}x, "
                    f"baseline decode {r['baseline']['decode_tok_s'] / one['baseline']['decode_tok_s']:.2f}x")
            if r.get("rewired") and one.get("rewired"):
                line += f", rewired {r['rewired']['tok_s'] / one['rewired']['tok_s']:.2f}x"
            print(line)
            if "roofline_decode_tok_s" in r and "roofline_decode_tok_s" in one:
                print(f"  decode roofline at {result['bandwidth'] / 1e9:.1f} GB/s (bytes a step must read: weights of "
                      f"the distinct experts hit + KV): batch 1 {one['roofline_decode_tok_s']:.0f} tok/s "
                      f"({one['step_bytes']['total'] / 1e6:.1f} MB/step), batch {B} "
                      f"{r['roofline_decode_tok_s']:.0f} tok/s ({r['step_bytes']['weights'] / 1e6:.1f} MB weights + "
                      f"{r['step_bytes']['kv'] / 1e6:.1f} MB KV per step): at most "
                      f"{r['roofline_decode_tok_s'] / one['roofline_decode_tok_s']:.2f}x batch 1 at the roofline; "
                      f"measured decode at {r['baseline']['decode_tok_s'] / r['roofline_decode_tok_s']:.0%} "
                      f"(batch {B}) and {one['baseline']['decode_tok_s'] / one['roofline_decode_tok_s']:.0%} "
                      f"(batch 1) of it")
    for q in result.get("queue", []):
        print(f"queue ({q['model']}, {'rewired' if q['rewired'] else 'baseline'}, {q['prompts']} prompts, batch "
              f"{q['batch']}): {q['queue_tok_s']:.0f} vs lock-step {q['lockstep_tok_s']:.0f} useful tok/s = "
              f"{q['speedup']:.2f}x; lock-step leaves {100 * q['lockstep_idle_fraction']:.0f}% of row-steps idle "
              f"(1/(1-idle) = {q['predicted_speedup']:.2f}x), the queue {100 * q['queue_idle_fraction']:.0f}%")
    print(f"load average: start {result.get('loadavg_start')}, end {result.get('loadavg_end')}")


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}models", nargs="+", default=["demo", "olmoe"])
    p.add_argument(f"--{prefix}batches", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument(f"--{prefix}new-tokens", type=int, default=256, help="demo model (OLMoE-shaped: --olmoe-new-tokens)")
    p.add_argument(f"--{prefix}olmoe-new-tokens", type=int, default=64)
    p.add_argument(f"--{prefix}rewired-max-batch", type=int, default=64, help="rewired rows up to this batch")
    p.add_argument(f"--{prefix}olmoe-rewired-max-batch", type=int, default=16)
    p.add_argument(f"--{prefix}queue-prompts", type=int, default=256)
    p.add_argument(f"--{prefix}queue-batch", type=int, default=16)
    p.add_argument(f"--{prefix}queue-rewired", action="store_true", help="also a rewired queue run")
    p.add_argument(f"--{prefix}skip-hf", action="store_true")
    p.add_argument(f"--{prefix}warm-runs", type=int, default=2, help="timed warm runs per row (best of)")


def run(a, json_path=None) -> dict:
    result: dict = {"rows": [], "queue": [], "args": vars(a)}
    if hasattr(os, "getloadavg"):
        result["loadavg_start"] = os.getloadavg()
    result["bandwidth"] = stream_bandwidth()
    print(f"memory bandwidth (jitted sum over 512 MB): {result['bandwidth'] / 1e9:.1f} GB/s", flush=True)
    for m in a.models:
        n = a.new_tokens if m == "demo" else a.olmoe_new_tokens
        rmax = a.rewired_max_batch if m == "demo" else a.olmoe_rewired_max_batch
        result["rows"] += model_rows(m, a.batches, n, a.skip_hf, rmax, warm_runs=a.warm_runs)
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    if a.queue_prompts:
        for rewired in ([False, True] if a.queue_rewired else [False]):
            result["queue"].append(queue_rows("demo", a.queue_prompts, a.queue_batch, a.new_tokens, rewired))
    if hasattr(os, "getloadavg"):
        result["loadavg_end"] = os.getloadavg()
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    report(result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.batch", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return run(a, a.json)


if __name__ == "__main__":
    main()
