"""Benchmark: rewire_jax against the PyTorch way, in one process, warm (compile time reported apart).

    python -m rewire_jax.bench                      # OLMoE-shaped model, CPU, paper defaults
    python -m rewire_jax.bench --new-tokens 128 --prompt-len 128 --quick
    python -m rewire_jax.bench --gpu                # on a GPU machine: fp32 and bf16 rows

The model is built locally with random weights (no download): an HF `OlmoeForCausalLM` (hidden 512,
8 layers, 8 heads, 32 experts top-4, expert width 256, vocab 8192 by default), saved with
`save_pretrained` to a temporary directory and loaded by `rewire_jax.load`, so both sides run the
same weights. Rows:

  HF generate            transformers `generate`, greedy, KV cache (the baseline everyone uses)
  torch rewired          the rewiring cycle the PyTorch way: the phases of the tests' oracle
                         (rewire_jax/bench/torch_reference.py `_phase`: n Adam steps, full forward + backward
                         per step) and a KV-cache greedy decode of each segment with the deltas
                         injected into the routers (prefill of the context after every phase)
  torch oracle           (--with-oracle) rewire_jax/bench/torch_reference.py `reference_generate` itself: no KV
                         cache, a full forward per token; slow, and checks the tokens
  rewire_jax baseline    `rewire_jax.generate(model, prompt, n)` (no rewiring)
  rewire_jax rewired     `rewire_jax.generate(..., rewire=RewireOptions(...))`

and, separately, the optimise phase of a hard selection whose lowest selected layer sits at 3/4
depth, computed the plain way (`cache_below=False`) and with the layers below computed once
(`cache_below=True`), against the ratio the FLOP count predicts; plus a matmul peak measured here,
against which the optimise phase's achieved GFLOP/s is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .sections import dispatch_table, split_benchmark  # noqa: F401
from .models import Shape, build_hf  # noqa: F401  (the benchmark's model; re-exported)
from .perf import (_timed, count_compiles, head_flops, layer_flops, matmul_peak, numpy_peak,  # noqa: F401
                   phase_flops, scratch_dir, shape_ceiling)


# -- the model ---------------------------------------------------------------------------------------

# -- the PyTorch way ---------------------------------------------------------------------------------

def _torch_reference():
    from . import torch_reference   # imports torch: only when the PyTorch rows run
    return torch_reference


def hf_generate(hf, prompt, n: int):
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        _sync()
        dt = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), {"total": dt}


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_rewired(hf, prompt, n: int, opts, tr):
    """The rewiring cycle the PyTorch way: tr._phase for each phase (as reference_generate), then a
    KV-cache greedy decode of the next segment with the deltas injected. Same tokens as the oracle."""
    import torch
    routers = tr.router_modules(hf)
    E = routers[0][1].shape[0]
    old = [p.requires_grad for p in hf.parameters()]
    hf.requires_grad_(False)
    timing = {"optimise": 0.0, "prefill": 0.0, "decode": 0.0}
    kw = dict(steps=opts.steps, lr=opts.lr, selection=opts.selection, ratio=opts.ratio,
              soft_mode=opts.soft_mode, confidence=opts.confidence, loss=opts.loss, last_k=opts.last_k,
              seed=opts.seed)
    t_start = time.perf_counter()
    try:
        deltas = [torch.nn.Parameter(torch.zeros(E, dtype=torch.float32)) for _ in routers]
        opt = tr._new_adam(deltas, opts.lr, opts.eps, opts.weight_decay)
        ctx, new, phases = list(prompt), [], 0
        while len(new) < n:
            if opts.enabled and (phases == 0 or opts.continuous):
                if not opts.persist_optimizer and phases:
                    opt = tr._new_adam(deltas, opts.lr, opts.eps, opts.weight_decay)
                t0 = time.perf_counter()
                tr._phase(hf, ctx, deltas, opt, phase_index=phases, **kw)
                _sync()
                timing["optimise"] += time.perf_counter() - t0
                phases += 1
            seg = min(opts.interval if (opts.enabled and opts.continuous) else n, n - len(new))
            with torch.no_grad(), tr.deltas_injected(hf, deltas):
                t0 = time.perf_counter()
                out = hf(input_ids=torch.tensor([ctx]), use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1]
                _sync()
                timing["prefill"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(seg):
                    tok = int(torch.argmax(logits))
                    ctx.append(tok)
                    new.append(tok)
                    if i + 1 < seg:
                        out = hf(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                        past, logits = out.past_key_values, out.logits[0, -1]
                _sync()
                timing["decode"] += time.perf_counter() - t0
        final = torch.stack([d.detach() for d in deltas]).cpu().numpy()
    finally:
        for p, flag in zip(hf.parameters(), old):
            p.requires_grad_(flag)
    timing["total"] = time.perf_counter() - t_start
    return new, final, timing


# -- the run ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    name: str
    seconds: float
    tokens: int
    optimise: Optional[float] = None
    prefill: Optional[float] = None
    decode: Optional[float] = None
    compile: Optional[float] = None
    note: str = ""

    @property
    def tok_s(self):
        return self.tokens / self.seconds

    @property
    def decode_tok_s(self):
        return self.tokens / self.decode if self.decode else None


def _best(fn, repeats: int):
    best = None
    for _ in range(max(1, repeats)):
        out = fn()
        if best is None or out[-1]["total"] < best[-1]["total"]:
            best = out
    return best


def run(args) -> dict:
    import jax

    import rewire_jax
    from rewire_jax import RewireOptions

    shape = Shape(args.hidden, args.layers, args.heads, args.experts, args.top_k, args.intermediate, args.vocab,
                  args.init_std)
    backend = jax.default_backend()
    result: dict = {"shape": dataclasses.asdict(shape), "backend": backend, "args": vars(args),
                    "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
                    "versions": _versions(), "tokens": {}, "deltas": {}}
    if hasattr(os, "getloadavg"):
        result["loadavg_start"] = os.getloadavg()
    torch = None
    cuda = False
    if not args.skip_torch:
        import torch
        torch.set_flush_denormal(True)   # XLA flushes denormals too; without it torch is slower
        cuda = args.gpu and torch.cuda.is_available()
    hf = build_hf(shape, args.seed)
    tmp = scratch_dir("rewire_bench_")
    hf.save_pretrained(tmp)
    rng = np.random.default_rng(args.seed + 1)
    prompt = rng.integers(3, shape.vocab, args.prompt_len).tolist()
    n = args.new_tokens
    ropts = RewireOptions(selection=args.selection, interval=args.interval, steps=args.steps)
    rows: list[Row] = []
    # fp32 means fp32: on GPU/TPU JAX would otherwise run fp32 matmuls as TF32 / bf16 passes
    exact = jax.default_matmul_precision("highest")
    with exact:
        result["matmul_peak_gflops"] = peak = matmul_peak()
    if backend == "cpu":
        result["numpy_peak_gflops"] = numpy_peak()
    else:
        result["matmul_peak_gflops_bf16"] = matmul_peak(dtype="bfloat16")
    print(f"backend {backend}; matmul peak (jax fp32) {peak:.1f} GFLOP/s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in result.items() if k.endswith('_gflops') and k != 'matmul_peak_gflops')}); "
          f"prompt {args.prompt_len}, new tokens {n}, interval {args.interval}, selection {args.selection}",
          flush=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result | {"rows": [_row_dict(r) for r in rows]},
                                                  indent=1, default=str))

    def torch_rows(dtype):
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        hf_dev = hf.to(dtype=tdt, device="cuda" if cuda else "cpu")
        # the oracle makes its tensors on the default device: cuda inside this block only
        with torch.device("cuda" if cuda else "cpu"):
            _torch_rows(dtype, hf_dev)

    def _torch_rows(dtype, hf_dev):
        try:
            hf_generate(hf_dev, prompt[:16], 4)   # warm-up
            toks, t = _best(lambda: hf_generate(hf_dev, prompt, n), args.repeats)
            rows.append(Row(f"HF generate ({dtype})", t["total"], n))
            result["tokens"][f"hf_{dtype}"] = toks
            print(f"  HF generate {dtype}: {t['total']:.2f} s", flush=True)
            save()
            tr = _torch_reference()
            torch_rewired(hf_dev, prompt[:16], 2, ropts.replace(interval=1, steps=1), tr)  # warm-up
            toks, d, t = _best(lambda: torch_rewired(hf_dev, prompt, n, ropts, tr), args.torch_repeats)
            rows.append(Row(f"torch rewired ({dtype})", t["total"], n, t["optimise"], t["prefill"], t["decode"]))
            result["tokens"][f"torch_rewired_{dtype}"] = toks
            result["deltas"][f"torch_{dtype}"] = d.tolist()
            print(f"  torch rewired {dtype}: {t}", flush=True)
            if args.with_oracle and dtype == "float32":
                t0 = time.perf_counter()
                ref = tr.reference_generate(hf_dev, prompt, n, steps=ropts.steps, interval=ropts.interval,
                                            selection=ropts.selection)
                rows.append(Row("torch oracle reference_generate", time.perf_counter() - t0, n,
                                note="no KV cache: a full forward per token"))
                result["tokens"]["torch_oracle"] = ref["tokens"]
                print(f"  torch oracle: {rows[-1].seconds:.1f} s", flush=True)
        finally:
            hf_dev.to(dtype=torch.float32, device="cpu")

    def jax_rows(dtype):
        model = rewire_jax.load(tmp, dtype=dtype, mesh=getattr(args, "mesh", None))

        def gen(opts):
            r = rewire_jax.generate(model, [prompt], n, rewire=opts, eos_token_id=None)
            return r, r.timing

        for label, opts in (("baseline", None), ("rewired", ropts)):
            with count_compiles() as compiled:
                t0 = time.perf_counter()
                gen(opts)
                cold = time.perf_counter() - t0
            r, t = _best(lambda: gen(opts), args.repeats)
            big = [c for c in compiled if c.strip("jit()") in ("prefill", "decode", "_steps_impl", "_first_step_impl")]
            rows.append(Row(f"rewire_jax {label} ({dtype})", t["total"], n, t["optimise"] if opts else None,
                            t["prefill"], t["decode"], compile=cold - t["total"],
                            note=f"{len(big)} programs compiled (+{len(compiled) - len(big)} tiny)"))
            result["tokens"][f"jax_{label}_{dtype}"] = r.tokens[0]
            if opts:
                result["deltas"][f"jax_{dtype}"] = r.deltas[0].tolist()
                T_ctx = [int(p.context_len[0]) for p in r.phases]
                fl = sum(phase_flops(model.config, T, ropts.steps, 0) for T in T_ctx)
                result[f"optimise_gflops_{dtype}"] = fl / 1e9 / t["optimise"]
                result[f"optimise_flops_{dtype}"] = fl
            print(f"  rewire_jax {label} {dtype}: {t} (cold {cold:.1f} s, {len(compiled)} compiles)", flush=True)
            if opts:
                T_mid = T_ctx[len(T_ctx) // 2]
                result[f"shape_ceiling_{dtype}"] = c = shape_ceiling(model.config, T_mid, dtype)
                result[f"shape_ceiling_context_{dtype}"] = T_mid
                print(f"  matmuls of the phase at their own shapes (T={T_mid}): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in c.items()) + " GFLOP/s", flush=True)
            save()
        if f"torch_{dtype}" in result["deltas"]:
            result[f"deltas_maxdiff_{dtype}"] = float(np.abs(np.asarray(result["deltas"][f"jax_{dtype}"])
                                                             - np.asarray(result["deltas"][f"torch_{dtype}"])).max())
        if not args.skip_split:
            try:
                result[f"split_{dtype}"] = split_benchmark(model, prompt, args, ropts)
            except Exception as e:  # noqa: BLE001
                print(f"  split benchmark ({dtype}) failed: {type(e).__name__}: {e}", flush=True)
                result.setdefault("errors", []).append(f"split {dtype}: {type(e).__name__}: {e}")

    if backend != "cpu":
        try:
            result["dispatch_table"] = dispatch_table(shape, args)
        except Exception as e:  # noqa: BLE001
            result.setdefault("errors", []).append(f"dispatch table: {type(e).__name__}: {e}")
        save()
    for dtype in args.dtypes:
        if torch is not None:
            try:
                torch_rows(dtype)
            except Exception as e:  # noqa: BLE001  (e.g. a transformers version without a feature)
                print(f"  torch rows ({dtype}) failed: {type(e).__name__}: {e}", flush=True)
                result.setdefault("errors", []).append(f"torch {dtype}: {type(e).__name__}: {e}")
            save()
        try:
            with (exact if dtype == "float32" else contextlib.nullcontext()):
                jax_rows(dtype)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            result.setdefault("errors", []).append(f"jax {dtype}: {type(e).__name__}: {e}")
        save()
    if hasattr(os, "getloadavg"):
        result["loadavg_end"] = os.getloadavg()
    result["rows"] = [_row_dict(r) for r in rows]
    save()
    report(result, rows, args)
    return result


def _row_dict(r: "Row") -> dict:
    return dataclasses.asdict(r) | {"tok_s": r.tok_s, "decode_tok_s": r.decode_tok_s}


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def report(result, rows: list[Row], args):
    def f(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)
    print()
    print(f"| run | wall s | tok/s | optimise s | prefill s | decode s | decode tok/s | compile s | note |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.seconds:.2f} | {r.tok_s:.1f} | {f(r.optimise)} | {f(r.prefill)} | {f(r.decode)} "
              f"| {f(r.decode_tok_s, '{:.1f}')} | {f(r.compile, '{:.1f}')} | {r.note} |")
    print()
    by = {r.name: r for r in rows}
    for dtype in args.dtypes:
        jr, jb = by.get(f"rewire_jax rewired ({dtype})"), by.get(f"rewire_jax baseline ({dtype})")
        tr, hf = by.get(f"torch rewired ({dtype})"), by.get(f"HF generate ({dtype})")
        toks = result.get("tokens", {})
        lines = []
        if jr and tr:
            same = _agree(toks.get(f"jax_rewired_{dtype}"), toks.get(f"torch_rewired_{dtype}"))
            lines.append(f"rewired end-to-end: torch {tr.seconds:.2f} s / rewire_jax {jr.seconds:.2f} s = "
                         f"{tr.seconds / jr.seconds:.2f}x (target >= 2x); same tokens: {same}; "
                         f"max |delta diff| {result.get(f'deltas_maxdiff_{dtype}', float('nan')):.2e}")
            lines.append(f"optimise: torch {tr.optimise:.2f} s / rewire_jax {jr.optimise:.2f} s = "
                         f"{tr.optimise / jr.optimise:.2f}x; prefill {tr.prefill / jr.prefill:.2f}x; "
                         f"decode {tr.decode / jr.decode:.2f}x")
        if jb and hf:
            same = _agree(toks.get(f"jax_baseline_{dtype}"), toks.get(f"hf_{dtype}"))
            lines.append(f"baseline decode: {jb.decode_tok_s:.1f} tok/s vs HF generate {hf.tok_s:.1f} tok/s = "
                         f"{jb.decode_tok_s / hf.tok_s:.2f}x (target >= 2.5x); end-to-end {jb.tok_s / hf.tok_s:.2f}x; "
                         f"same tokens: {same}")
        if f"optimise_gflops_{dtype}" in result:
            g = result[f"optimise_gflops_{dtype}"]
            peaks = [("the jax square-matmul peak", result["matmul_peak_gflops"])]
            if "numpy_peak_gflops" in result:
                peaks.append(("the numpy sgemm peak", result["numpy_peak_gflops"]))
            if f"shape_ceiling_{dtype}" in result:
                peaks.append((f"the phase's own matmul shapes (T={result[f'shape_ceiling_context_{dtype}']})",
                              result[f"shape_ceiling_{dtype}"]["weighted"]))
            lines.append(f"optimise phase: {g:.1f} useful GFLOP/s = "
                         + "; ".join(f"{100 * g / v:.0f}% of {k} {v:.0f}" for k, v in peaks)
                         + " (target >= 60%)")
        sp = result.get(f"split_{dtype}")
        if sp:
            for sel in ("hard", "last_k"):
                s = sp[sel]
                lines.append(
                    f"split ({sel}, layers {s['selected_layers']}, T={sp['context']}): plain {s['t_plain']:.3f} s, "
                    f"cached {s['t_cached']:.3f} s = {s['speedup']:.2f}x; FLOP-predicted {s['predicted_brief']:.2f}x "
                    f"(brief's plain) / {s['predicted_actual_plain']:.2f}x (plain as run); speedup = "
                    f"{100 * s['speedup'] / s['predicted_brief']:.0f}% of predicted, time saved = "
                    f"{100 * s['saving_achieved']:.0f}% of predicted saving (target >= 80%); "
                    f"max |delta diff| {s['max_abs_delta_diff']:.1e}")
        print(f"[{dtype}]")
        for l in lines:
            print("  " + l)


def _agree(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "all %d" % len(a) if n is None and len(a) == len(b) else f"first {n} of {len(a)}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench", description=__doc__.split("\n")[0])
    s = Shape()
    p.add_argument("--hidden", type=int, default=s.hidden)
    p.add_argument("--layers", type=int, default=s.layers)
    p.add_argument("--heads", type=int, default=s.heads)
    p.add_argument("--experts", type=int, default=s.experts)
    p.add_argument("--top-k", type=int, default=s.top_k)
    p.add_argument("--intermediate", type=int, default=s.intermediate)
    p.add_argument("--vocab", type=int, default=s.vocab)
    p.add_argument("--init-std", type=float, default=s.init_std, help="HF initializer_range")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--selection", default="soft")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 and/or bfloat16 (default: float32 on "
                   "CPU, float32 bfloat16 with --gpu)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (best of) of the fast rows")
    p.add_argument("--torch-repeats", type=int, default=1)
    p.add_argument("--split-context", type=int, default=None, help="context of the split comparison (default: prompt)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-split", action="store_true")
    p.add_argument("--with-oracle", action="store_true", help="also run torch_reference.reference_generate")
    p.add_argument("--gpu", action="store_true", help="GPU/TPU run: torch on CUDA when available; fp32 + bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    from ..distributed import add_arguments
    add_arguments(p)   # --mesh (and the multi-host flags) for the rewire_jax rows
    p.add_argument("--quick", action="store_true", help="a small smoke run (prompt 64, 64 tokens, interval 32)")
    p.add_argument("--batch-table", action="store_true", help="then the batch table (rewire_jax.bench.batch, "
                   "its defaults: demo + OLMoE-shaped model at batch 1/4/16/64, HF generate, queue vs lock-step)")
    p.add_argument("--batch-only", action="store_true", help="only the batch table")
    args = p.parse_args(argv)
    if args.batch_table or args.batch_only:
        from . import batch
        batch_json = [] if not args.json else ["--json", str(Path(args.json).with_suffix(".batch.json"))]
        if args.batch_only:
            return batch.main(batch_json)
    if args.quick:
        args.prompt_len, args.new_tokens, args.interval, args.repeats = 64, 64, 32, 1
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if args.gpu else ["float32"]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.batch_table:
        from . import batch
        result["batch"] = batch.main(batch_json)


if __name__ == "__main__":
    main()
