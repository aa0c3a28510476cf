"""Results from sample records: per-problem scores, Table-1-style markdown, cost table, merge.

Per problem: one sample -> its 0/1 correctness; k samples (sc:k) -> code: pass@k (any of the k
passes, = the unbiased estimator with n = k), other tasks: the majority vote's correctness (a tied
vote gets fractional credit, `metrics.maj_at_k` with k = n). Each (task, method) cell: mean over
problems with a 95% CI (Wilson on 0/1 scores, else percentile bootstrap) and, for methods other
than `baseline`, the exact sign test on the paired per-problem scores vs the baseline on the
problems both have (McNemar's exact test when scores are 0/1). Tasks of kind 'integer' (AIME) and
every task with n >= 2 samples per problem also get pass@k and maj@k for k in 1, 2, 4, 8 (<= n),
and the diversity of the n samples (`diversity`: TF-IDF, and embeddings when an `embed` is given).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from . import diversity, metrics
from .runner import TIMING_FIELDS, append_records, read_records, record_key
from .tasks import get_task


def load_dir_records(run_dir) -> list[dict]:
    recs = []
    for f in sorted(Path(run_dir).glob("samples*.jsonl")):
        recs += read_records(f)
    return recs


def merge(inputs: Sequence, out_dir) -> Path:
    """Join shard files / run dirs into out_dir/samples.jsonl (duplicates must agree; kept once)."""
    seen: dict = {}
    for src in inputs:
        src = Path(src)
        recs = load_dir_records(src) if src.is_dir() else read_records(src)
        for r in recs:
            k = record_key(r)
            strip = lambda d: {a: b for a, b in d.items() if a not in TIMING_FIELDS}
            if k in seen and strip(seen[k]) != strip(r):
                raise ValueError(f"conflicting records for {k} in {src}")
            seen.setdefault(k, r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "samples.jsonl"
    if target.exists():
        raise FileExistsError(f"{target} exists; merge into a new directory")
    append_records(target, list(seen.values()))
    for src in inputs:   # keep the run settings alongside
        cfg = Path(src) / "config.json"
        if Path(src).is_dir() and cfg.exists() and not (out / "config.json").exists():
            (out / "config.json").write_text(cfg.read_text())
    return target


def problem_scores(recs: Iterable[dict], kind: str) -> dict:
    """problem_id -> score in [0, 1] (see module doc)."""
    by = defaultdict(list)
    for r in recs:
        by[r["problem_id"]].append(r)
    out = {}
    for pid, rs in by.items():
        rs.sort(key=lambda r: r["sample"])
        if len(rs) == 1:
            out[pid] = float(rs[0]["correct"])
        elif kind == "code":
            out[pid] = float(any(r["correct"] for r in rs))
        else:
            out[pid] = metrics.maj_at_k([r["answer"] for r in rs], [r["correct"] for r in rs], len(rs))
    return out


def k_metrics(recs: Sequence[dict]) -> dict:
    """pass@k and maj@k (k in 1, 2, 4, 8, k <= samples per problem), averaged over problems."""
    by = defaultdict(list)
    for r in recs:
        by[r["problem_id"]].append(r)
    n = min(len(v) for v in by.values())
    out = {}
    for k in (1, 2, 4, 8):
        if k > n:
            break
        out[f"pass@{k}"] = float(np.mean([metrics.pass_at_k(len(v), sum(r["correct"] for r in v), k)
                                          for v in by.values()]))
        out[f"maj@{k}"] = float(np.mean([metrics.maj_at_k([r["answer"] for r in v], [r["correct"] for r in v], k)
                                         for v in by.values()]))
    return out


def summarize(recs: Sequence[dict], embed: Optional[diversity.Embed] = None) -> dict:
    """{"tasks": {task: {method: cell}}, "cost": {method: {...}}, "methods": [...], "task_names": [...]}.
    Cells with >= 2 samples per problem carry "diversity" (`diversity.summary`; None without scikit-learn)."""
    groups = defaultdict(list)
    for r in recs:
        groups[(r["task"], r["method"])].append(r)
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    methods = list(dict.fromkeys(r["method"] for r in recs))
    res = {"tasks": {}, "cost": {}, "methods": methods, "task_names": tasks}
    for t in tasks:
        kind = get_task(t).kind
        base = problem_scores(groups.get((t, "baseline"), []), kind)
        res["tasks"][t] = {}
        for m in methods:
            rs = groups.get((t, m))
            if not rs:
                continue
            ps = problem_scores(rs, kind)
            vals = list(ps.values())
            lo, hi = metrics.mean_ci(vals)
            cell = {"score": float(np.mean(vals)), "ci95": [lo, hi], "problems": len(vals), "samples": len(rs),
                    "samples_per_problem": len(rs) // max(1, len(vals))}
            common = sorted(set(ps) & set(base))
            if m != "baseline" and common:
                st = metrics.sign_test([ps[p] for p in common], [base[p] for p in common])
                cell["vs_baseline"] = {"delta": float(np.mean([ps[p] - base[p] for p in common])),
                                       "paired_problems": len(common), **st}
            if kind == "integer" or cell["samples_per_problem"] >= 2:
                cell.update(k_metrics(rs))
            if cell["samples_per_problem"] >= 2:
                cell["diversity"] = diversity.summary(rs, embed) if diversity.sklearn_available() else None
            res["tasks"][t][m] = cell
    for m in methods:
        rs = [r for r in recs if r["method"] == m]
        res["cost"][m] = {"samples": len(rs), "gflops_per_sample": float(np.mean([r["flops"] for r in rs]) / 1e9),
                          "seconds_per_sample": float(np.mean([r["seconds"] for r in rs])),
                          "new_tokens_per_sample": float(np.mean([r["new_tokens"] for r in rs]))}
    return res


def markdown(res: dict) -> str:
    """Table 1 (methods x tasks, % with 95% CI, Δ vs baseline with the sign-test p) + Table 3 (cost)."""
    tasks, methods = res["task_names"], res["methods"]
    lines = ["| method | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells, scores = [], []
        for t in tasks:
            c = res["tasks"][t].get(m)
            if c is None:
                cells.append("")
                continue
            scores.append(c["score"])
            s = f"{100 * c['score']:.2f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"
            if "vs_baseline" in c:
                v = c["vs_baseline"]
                s += f" (Δ {100 * v['delta']:+.2f}, p={v['p']:.3g})"
            cells.append(s)
        avg = f"{100 * np.mean(scores):.2f}" if len(scores) == len(tasks) else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    out = ["## Scores (%, 95% CI; Δ and exact sign-test p vs baseline on the same problems)", ""] + lines
    extra = [(t, m, c) for t in tasks for m, c in res["tasks"][t].items() if "pass@1" in c]
    if extra:
        out += ["", "## pass@k / maj@k", "", "| task | method | " + " | ".join(k for k in extra[0][2] if "@" in k) + " |",
                "|---|---|" + "---|" * sum("@" in k for k in extra[0][2])]
        out += [f"| {t} | {m} | " + " | ".join(f"{100 * v:.2f}" for k, v in c.items() if "@" in k) + " |"
                for t, m, c in extra]
    out += diversity.markdown(res)
    out += ["", "## Cost per sample (Table 3 style; FLOPs estimated, see docs/evaluation.md)", "",
            "| method | GFLOPs / sample | seconds / sample | new tokens / sample |", "|---|---|---|---|"]
    out += [f"| {m} | {c['gflops_per_sample']:.2f} | {c['seconds_per_sample']:.3f} | {c['new_tokens_per_sample']:.1f} |"
            for m, c in res["cost"].items()]
    return "\n".join(out) + "\n"


def write_report(run_dir, embed: Optional[diversity.Embed] = None) -> dict:
    """results.json + results.md in run_dir from every samples*.jsonl there (`embed`: see summarize)."""
    recs = load_dir_records(run_dir)
    if not recs:
        raise ValueError(f"no samples in {run_dir}")
    res = summarize(recs, embed)
    Path(run_dir, "results.json").write_text(json.dumps(res, indent=1))
    Path(run_dir, "results.md").write_text(markdown(res))
    return res
