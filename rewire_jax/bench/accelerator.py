"""The accelerator profile: rewired and baseline generation on one device against the hardware's limits.

    python -m rewire_jax.bench.accelerator [--json OUT] [--table OUT]          # GPU / TPU: OLMoE-1B-7B shape
    python -m rewire_jax.bench.accelerator --backend cpu --shape tiny          # the CI run (a minute)

Weights: random, drawn on the device (`init_params`: nothing read or written), in `--dtype`
(bfloat16), of `--shape` olmoe-1b-7b (OLMoE-1B-7B-0924's config: 16 layers, hidden 2048, 64 experts
top-8 of width 1024, vocab 50304; `--layers` of them), bench (the CPU benchmark model,
`bench.models.Shape`) or tiny. Per batch size B of `--batches` (1 32): B distinct random prompts of
`--prompt-lens` (256 640) tokens, sampled at temperature 1 (a random model's greedy output collapses
into one repeated token, which would flatter the routed experts' traffic), `--new-tokens` each;
baseline and rewired (paper defaults, `--interval`) `generate`, each once cold (compile) and once
warm (reported). Reported per B:

- decode ms/token (one step of the batch) and its % of the HBM roofline: the bytes a step must read
  (`bench.batch.decode_step_bytes`: every weight but the embedding table, the distinct routed experts
  the batch's rows hit per MoE layer (k at B=1; counted from a teacher-forced forward of the
  baseline's tokens at B>1), each row's KV over its context) over the bandwidth measured in the same
  run (`perf.copy_bandwidth`: a device copy);
- prefill ms and its % of the byte floor (every weight once) and the FLOP floor (its useful FLOPs at
  the bf16 matmul peak measured in the same run);
- every optimise phase's seconds and its % of its byte floor (per Adam step a forward reading every
  weight, all experts, and a backward reading the layers above the lowest updated one and the LM
  head) and its FLOP floor (`perf.phase_flops`, summed over rows);
- rewired / baseline wall time; peak device memory (`device.memory_stats`, "not available" on CPU);
- the compiled decode step's op counts and the ops that implement the routed experts in it and in
  the prefill over the prompts (whose MoE layers dispatch like the phase's forward over the same
  rows) (`bench.opcount`: dots / fusions / custom-call targets under the `experts` scope).

The JSON is rewritten after every section (a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .models import SHAPES, shape_config

def layer_split_bytes(model) -> dict:
    """Bytes read by one forward over all experts ('forward': every weight but the embedding table),
    the LM head's ('head'), and one decoder layer's (the rest over the layers: equal layers)."""
    from .batch import decode_step_bytes
    cfg = model.config
    fwd = decode_step_bytes(model, cfg.num_experts, 0, 1)["weights"]
    head = model.params["embed" if cfg.tie_word_embeddings else "lm_head"].nbytes
    return {"forward": fwd, "head": head, "layer": (fwd - head) / cfg.num_layers}


def phase_floors(model, contexts, steps: int, lowest: int, bw: float, peak: float) -> dict:
    """Byte and FLOP floors (seconds) of one phase over rows of `contexts` tokens."""
    from .perf import phase_flops
    b = layer_split_bytes(model)
    bwd = b["layer"] * (model.config.num_layers - 1 - lowest) + b["head"]
    nbytes = steps * (b["forward"] + bwd)
    flops = sum(phase_flops(model.config, int(T), steps, lowest) for T in contexts if T > 0)
    return {"bytes": nbytes, "flops": flops, "byte_floor_s": nbytes / bw, "flop_floor_s": flops / peak}


def prefill_floors(model, lengths, bw: float, peak: float) -> dict:
    from .perf import head_flops, layer_flops
    cfg = model.config
    nbytes = layer_split_bytes(model)["forward"]
    flops = sum(cfg.num_layers * layer_flops(cfg, int(T))[0] + head_flops(cfg, 1) for T in lengths)
    return {"bytes": nbytes, "flops": flops, "byte_floor_s": nbytes / bw, "flop_floor_s": flops / peak}


def peak_memory(dev):
    stats = dev.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return "not available"
    return stats["peak_bytes_in_use"]


def _generate(model, prompts, n, opts, sampling):
    import rewire_jax
    t0 = time.perf_counter()
    rewire_jax.generate(model, prompts, n, rewire=opts, sampling=sampling, seed=0, eos_token_id=None)
    cold = time.perf_counter() - t0
    r = rewire_jax.generate(model, prompts, n, rewire=opts, sampling=sampling, seed=0, eos_token_id=None)
    return r, cold - r.timing["total"]


def batch_row(model, B: int, a, bw: float, peak: float, rng) -> dict:
    """Everything measured at batch B (see the module doc)."""
    import jax
    from ..rewire import RewireOptions, bucket_length
    from ..generation.sampling import Sampling
    from .batch import decode_step_bytes, distinct_experts
    from .opcount import count_program, decode_step_counts, prefill_hlo
    cfg, n = model.config, a.new_tokens
    lens = rng.integers(a.prompt_lens[0], a.prompt_lens[1] + 1, B)
    prompts = [rng.integers(3, cfg.vocab_size, L).tolist() for L in lens]
    row = {"batch": B, "prompt_lens": [int(x) for x in lens], "new_tokens": n}
    opts = RewireOptions(interval=a.interval)
    for label, o in (("baseline", None), ("rewired", opts)):
        r, compile_s = _generate(model, prompts, n, o, Sampling(1.0))
        t = {k: float(v) for k, v in r.timing.items()}
        row[label] = {"wall_s": t["total"], "compile_s": compile_s, "timing": t,
                      "decode_ms_per_token": 1e3 * t["decode"] / n, "tok_per_s": B * n / t["total"]}
        if o is None:
            tokens = r.tokens
            row[label]["prefill_ms"] = 1e3 * t["prefill"]
        else:
            row["phases"] = []
            for p in r.phases:
                f = phase_floors(model, p.context_len, opts.steps, cfg.moe_layers[0], bw, peak)
                row["phases"].append({"seconds": p.seconds_optimise, "contexts": [int(c) for c in p.context_len],
                                      **f, "pct_byte_floor": 100 * f["byte_floor_s"] / p.seconds_optimise,
                                      "pct_flop_floor": 100 * f["flop_floor_s"] / p.seconds_optimise})
        print(f"  B={B} {label}: {json.dumps(row[label])}", flush=True)
    row["rewired_over_baseline"] = row["rewired"]["wall_s"] / row["baseline"]["wall_s"]
    # decode roofline: the experts a step touches (k distinct at B=1: top-k picks distinct experts)
    row["distinct_experts"] = float(cfg.num_experts_per_tok) if B == 1 else distinct_experts(model, prompts, tokens)
    row["step_bytes"] = decode_step_bytes(model, row["distinct_experts"], float(np.mean(lens)) + (n - 1) / 2, B)
    floor_ms = 1e3 * row["step_bytes"]["total"] / bw
    row["decode_floor_ms"] = floor_ms
    row["decode_pct_roofline"] = 100 * floor_ms / row["baseline"]["decode_ms_per_token"]
    pf = prefill_floors(model, lens, bw, peak)
    sec = row["baseline"]["prefill_ms"] / 1e3
    row["prefill"] = {**pf, "ms": 1e3 * sec, "tokens": int(sum(lens)), "pct_byte_floor": 100 * pf["byte_floor_s"] / sec,
                      "pct_flop_floor": 100 * pf["flop_floor_s"] / sec}
    row["peak_device_bytes"] = peak_memory(jax.devices()[0])
    cache_len = bucket_length(int(max(lens)) + n)
    row["op_counts"] = decode_step_counts(model.params, cfg, B, cache_len)
    # the experts at context scale: the prefill over the prompts' bucket (the phase's forward
    # dispatches the same way over the same rows)
    pre = count_program(prefill_hlo(model.params, cfg, B, bucket_length(int(max(lens)))), cfg.num_layers)
    row["prefill_routed_experts"] = pre["routed_experts"]
    return row


def expert_kernel(counts: dict) -> str:
    """One line naming what runs the routed experts in the decode step's HLO."""
    ops = counts.get("routed_experts", {})
    calls = sorted({k.split(" ", 1)[1] for k in ops if k.startswith("custom-call ")})
    if calls:
        return "custom call " + ", ".join(calls)
    fus = ", ".join(f"{k.split(' ', 1)[1]} x{n}" for k, n in sorted(ops.items()) if k.startswith("fusion "))
    return f"{ops.get('dot', 0)} XLA dots; fusions {fus or '-'}; no custom call"


def table(res: dict) -> str:
    """The printed summary of a profile result."""
    gb = lambda x: (f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.3f} MB") if isinstance(x, (int, float)) else str(x)
    out = [f"accelerator profile: {res['device']} ({res['backend']}), jax {res['jax']}, shape {res['shape']} "
           f"({res['layers']} layers, {res['dtype']}), weights {gb(res['weights_bytes'])}",
           f"measured: copy bandwidth {res['bandwidth_Bps'] / 1e9:.1f} GB/s, {res['dtype']} matmul peak "
           f"{res['matmul_peak_flops'] / 1e12:.2f} TFLOP/s", ""]
    hdr = ("batch", "decode ms/tok", "floor ms", "% roofline", "prefill ms", "% bytes/FLOP floor", "phase s (mean)",
           "% bytes/FLOP floor", "rewired/base", "peak mem", "ops/step d/f/cc/k")
    rows = []
    for r in res["batches"]:
        ph = r.get("phases") or []
        mean = lambda k: float(np.mean([p[k] for p in ph])) if ph else float("nan")
        c = r["op_counts"]["total"]
        rows.append((str(r["batch"]), f"{r['baseline']['decode_ms_per_token']:.2f}", f"{r['decode_floor_ms']:.3f}",
                     f"{r['decode_pct_roofline']:.1f}", f"{r['prefill']['ms']:.1f}",
                     f"{r['prefill']['pct_byte_floor']:.1f}/{r['prefill']['pct_flop_floor']:.1f}",
                     f"{mean('seconds'):.3f}", f"{mean('pct_byte_floor'):.1f}/{mean('pct_flop_floor'):.1f}",
                     f"{r['rewired_over_baseline']:.2f}", gb(r["peak_device_bytes"]),
                     f"{c['dots']}/{c['fusions']}/{c['custom_calls']}/{c['kernels']}"))
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(hdr)]
    out += ["  ".join(h.rjust(n) for h, n in zip(hdr, w))] + ["  ".join(x.rjust(n) for x, n in zip(row, w))
                                                               for row in rows]
    for r in res["batches"]:
        pl = r["op_counts"]["per_layer"]
        out.append(f"batch {r['batch']}: decode step per layer {pl['dots']} dots, {pl['fusions']} fusions, "
                   f"{pl['custom_calls']} custom calls, {pl['kernels']} kernels; {r['distinct_experts']:.1f} distinct "
                   f"experts/layer/step; step reads {gb(r['step_bytes']['total'])}")
        out.append(f"  routed experts, decode: {expert_kernel(r['op_counts'])}")
        out.append(f"  routed experts, prefill / phase: {expert_kernel({'routed_experts': r['prefill_routed_experts']})}")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.accelerator", description=__doc__.split("\n")[0])
    p.add_argument("--backend", default=None, help="jax platform: gpu, cuda, tpu or cpu (default: jax's default)")
    p.add_argument("--shape", default="olmoe-1b-7b", choices=SHAPES)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-lens", type=int, nargs=2, default=[256, 640], metavar=("MIN", "MAX"))
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--interval", type=int, default=128, help="rewiring interval (tokens between phases)")
    p.add_argument("--bandwidth-mb", type=int, default=2048, help="MiB copied to measure the bandwidth")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 4096, 8192],
                   help="square matmul sizes of the FLOP peak")
    p.add_argument("--json", default=None)
    p.add_argument("--table", default=None, help="also write the printed table to this file")
    a = p.parse_args(argv)
    lo, hi = a.prompt_lens
    if not 1 <= lo <= hi or a.new_tokens < 1 or min(a.batches) < 1 or a.interval < 1:
        p.error(f"need 1 <= --prompt-lens MIN <= MAX (got {lo} {hi}), --new-tokens >= 1, --batches >= 1, --interval >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import jax
    if a.backend:
        jax.config.update("jax_platforms", a.backend)
    from ..api import Model
    from ..io import families
    from ..model.weights import init_params, num_params
    from .perf import copy_bandwidth, matmul_peak

    cfg = families.from_hf(shape_config(a.shape, a.layers), dtype=a.dtype)
    t0 = time.perf_counter()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    dev = jax.devices()[0]
    res = {"command": "python -m rewire_jax.bench.accelerator " + " ".join(argv if argv is not None else
                                                                          __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": dev.device_kind,
           "backend": jax.default_backend(), "jax": jax.__version__, "shape": a.shape, "layers": cfg.num_layers,
           "dtype": a.dtype, "params": num_params(params),
           "weights_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "init_s": time.perf_counter() - t0,
           "batches": []}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))

    res["bandwidth_Bps"] = copy_bandwidth(a.bandwidth_mb)
    res["matmul_peak_flops"] = 1e9 * matmul_peak(3, a.dtype, tuple(a.peak_sizes))
    print(json.dumps({k: v for k, v in res.items() if k != "batches"}), flush=True)
    save()
    model = Model(cfg, params)
    rng = np.random.default_rng(0)
    for B in a.batches:
        res["batches"].append(batch_row(model, B, a, res["bandwidth_Bps"], res["matmul_peak_flops"], rng))
        save()
    text = table(res)
    print(text, flush=True)
    if a.table:
        Path(a.table).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
