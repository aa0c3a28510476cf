"""`rewire-jax generate`: rewired (or baseline) generation from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .demo import DEMO_MODEL

NEXT_STEPS = ("next: `rewire-jax eval --help` scores rewiring on benchmark tasks (HumanEval, MATH, ...); "
              "the documentation (the algorithm, its options, evaluation, the API) is under docs/")


def _parser() -> argparse.ArgumentParser:
    from .cli_options import add_rewire_arguments
    from .model.config import DISPATCH_METHODS

    from . import __version__

    p = argparse.ArgumentParser(prog="rewire-jax", description=__doc__)
    p.add_argument("--version", action="version", version=f"rewire-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with test-time rerouting",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", default=None,
                   help="HF model directory, a directory written by `python -m convert`, or a hub id "
                        "(e.g. allenai/OLMoE-1B-7B-0924, via huggingface_hub's cache) "
                        "(default: the bundled demo model)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the model directory)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--baseline", action="store_true", help="no optimisation at all (deltas stay 0)")
    g.add_argument("--compare", action="store_true", help="run baseline and rewired, print both")
    add_rewire_arguments(g)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling PRNG seed (and random selection)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--dispatch", choices=DISPATCH_METHODS, default="auto",
                   help="how the routed experts are computed (all exact; auto picks per backend and shape)")
    from . import distributed
    distributed.add_arguments(g)
    g.add_argument("--json", metavar="OUT", help="write tokens, text, deltas and phases to this JSON file")
    g.add_argument("--quiet", action="store_true", help="no streaming / per-phase lines")
    g.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("REWIRE_JAX_COMPILE_CACHE"),
                   help="keep compiled XLA programs in DIR (JAX's persistent compilation cache; env "
                        "REWIRE_JAX_COMPILE_CACHE; default: a per-user directory keyed by backend and CPU "
                        "features, ~/.cache/rewire-jax/jax-cache/<backend>-<hash>): a rerun skips most "
                        "compilation")
    g.add_argument("--no-compile-cache", action="store_true", help="compile everything, keep nothing on disk")
    g.add_argument("--cpu-compile", choices=("fast", "optimized"), default="fast",
                   help="XLA:CPU code generation: fast = backend optimisation level 0 (about half the "
                        "compile time; results equal up to the last float bits; best for short runs), "
                        "optimized = XLA's default (for long runs on CPU). No effect with an accelerator "
                        "plugin installed or XLA_FLAGS setting the level")
    from .conversation import repl
    repl.add_parser(sub)
    from .serve import cli as serve_cli
    serve_cli.add_parser(sub)
    from .eval import cli as eval_cli
    eval_cli.add_parser(sub)
    # parsed by lm-eval itself (`_main` hands everything after `lm-eval` to it); listed here for --help
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness's CLI with the rewire-jax backend (--model rewire-jax); "
                        "`rewire-jax lm-eval --help` for its arguments")
    ev = sub.add_parser("env", help="versions, backend, devices and compile-cache location (for bug reports)")
    ev.add_argument("--json", action="store_true", help="print the same as one JSON object")
    return p


def env_main(a) -> int:
    from . import envinfo

    info = envinfo.collect()
    print(json.dumps(info, indent=1) if a.json else envinfo.format_report(info))
    return 0


def _run(model, prompt, a, rewire, label: str):
    from .generation import Sampling, generate

    printed = [0]
    # stream only what is printed: a callback makes `generate` decode in short (32-token) chunks, and
    # every chunk's attention window is one more compiled decode program (--compare: 8 instead of 2,
    # which the rewired run then shares with the baseline)
    stream = model.tokenizer is not None and not a.quiet and not a.compare

    def on_segment(_, toks):
        text = model.decode(toks[0])
        sys.stdout.write(text[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(text)

    def on_phase(r):
        if not a.quiet:
            print(f"\n[{label} phase {r.index}] context {int(r.context_len[0])} tokens: "
                  f"loss {float(r.loss_before[0]):.4f} -> {float(r.loss_after[0]):.4f} "
                  f"({r.seconds_optimise:.2f}s optimise)", file=sys.stderr, flush=True)

    result = generate(model, [prompt], a.max_new_tokens, rewire=rewire,
                      sampling=Sampling(a.temperature, a.top_k, a.top_p), seed=a.seed,
                      on_segment=on_segment if stream else None, on_phase=on_phase)
    if model.tokenizer is not None and not a.quiet and not a.compare:
        print()
    return result


def _runs(model, prompt, a, opts, want_summary: bool) -> dict:
    """{'baseline': ..., 'rewired': ...} results of the runs asked for. --compare on one device and
    one process runs the baseline on a second thread while the rewired run goes on: XLA compiles
    each thread's programs on its own core (most of a short run is compilation), the baseline's
    decode programs are the ones the rewired run then finds compiled, and the summary's forward is
    compiled there too. Each run's tokens are those it gives alone (nothing is shared but programs).
    Several devices or processes run one after the other: concurrent multi-device programs could
    interleave differently on different devices."""
    import jax

    runs = {}
    if not a.compare:
        runs["baseline" if a.baseline else "rewired"] = _run(model, prompt, a, None if a.baseline else opts,
                                                             "baseline" if a.baseline else "rewired")
        return runs
    if model.config.mesh is not None or jax.process_count() > 1:
        runs["baseline"] = _run(model, prompt, a, None, "baseline")
        runs["rewired"] = _run(model, prompt, a, opts, "rewired")
        return runs
    from concurrent.futures import ThreadPoolExecutor

    from .analysis import prepare_summary

    def baseline():
        r = _run(model, prompt, a, None, "baseline")
        if want_summary:
            prepare_summary(model, len(prompt) + a.max_new_tokens)
        return r

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(baseline)
        runs["rewired"] = _run(model, prompt, a, opts, "rewired")
        runs = {"baseline": job.result(), **runs}
    return runs


def generate_main(a) -> int:
    import numpy as np

    from .api import load

    model_dir = a.model or DEMO_MODEL
    if a.model is None and not (DEMO_MODEL / "config.json").exists():
        print("error: the bundled demo model is missing from this install; pass --model DIR", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    from . import compile_cache, distributed
    if a.cpu_compile == "fast":
        compile_cache.fast_cpu_compile()   # before the backend starts: XLA reads its flags once
    distributed.from_args(a)   # before anything touches the backend
    if not a.no_compile_cache:   # before the first compilation
        compile_cache.enable(a.compile_cache or compile_cache.default_dir())
    # decided before the line below: the summary's forward is sharded, so every process runs it or none
    want_summary = not a.baseline and (not a.quiet or bool(a.json))
    if not distributed.is_main():   # every host runs the same command; only process 0 prints and writes
        a.quiet, a.json = True, None
    model = load(model_dir, dtype=a.dtype, dispatch=a.dispatch, mesh=a.mesh)
    t_load = time.perf_counter() - t0
    if a.prompt_ids:
        try:
            prompt = [int(t) for t in a.prompt_ids.split(",") if t.strip()]
        except ValueError:
            print(f"error: --prompt-ids must be comma-separated integers, got {a.prompt_ids!r}", file=sys.stderr)
            return 2
    elif a.prompt is not None:
        if model.tokenizer is None:
            print(f"error: {model_dir} has no tokenizer; use --prompt-ids", file=sys.stderr)
            return 2
        prompt = model.encode(a.prompt)
    else:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    from .cli_options import rewire_options

    opts = rewire_options(a)
    if a.prompt is not None and not a.quiet and not a.compare and model.tokenizer is not None:
        sys.stdout.write(a.prompt)
    runs = _runs(model, prompt, a, opts, want_summary)
    if a.compare:
        for name, r in runs.items():
            body = r.texts[0] if r.texts else " ".join(map(str, r.tokens[0]))
            print(f"\n===== {name} ({len(r.tokens[0])} tokens, {r.timing['total']:.1f}s) =====")
            print((a.prompt or "") + body)
    main_run = runs.get("rewired", runs.get("baseline"))
    summary = None
    if want_summary:
        from .analysis import summarize
        r = runs["rewired"]
        summary = summarize(model, prompt, r.tokens[0], r.deltas[0], r.phase_dicts())
    if summary is not None and not a.quiet:
        print(f"\n===== what rewiring did =====\n{summary.table()}")
    if not a.quiet:
        print(NEXT_STEPS)
    if a.json:
        out = {"tokens": main_run.tokens[0], "text": main_run.texts[0] if main_run.texts else None,
               "deltas": np.asarray(main_run.deltas[0]).tolist(), "moe_layers": list(model.config.moe_layers),
               "phases": main_run.phase_dicts(),
               "timing": {**main_run.timing, "load": t_load}, "options": None if a.baseline else vars(opts)}
        out["timing"]["wall"] = time.perf_counter() - t0
        if summary is not None:
            out["summary"] = summary.to_dict()
        if a.compare:
            b = runs["baseline"]
            out["baseline"] = {"tokens": b.tokens[0], "text": b.texts[0] if b.texts else None}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    # transformers' "PyTorch was not found" notice: this CLI uses only its tokenizers (no torch needed);
    # set for this call only (main() also runs in-process, e.g. in tests)
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ
    if quiet:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        return _main(argv)
    finally:
        if quiet:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        return _lm_eval(argv[1:])
    a = _parser().parse_args(argv)
    try:
        if a.command == "generate":
            return generate_main(a)
        if a.command == "chat":
            from .conversation import repl
            return repl.main(a)
        if a.command == "serve":
            from .serve import cli as serve_cli
            return serve_cli.main(a)
        if a.command == "eval":
            from .eval import cli as eval_cli
            return eval_cli.main(a)
        if a.command == "env":
            return env_main(a)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def _lm_eval(argv) -> int:
    try:
        from .eval.lm_eval_backend import cli_main
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return cli_main(argv)
    except (ValueError, FileNotFoundError) as e:   # bad model_args / paths: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
