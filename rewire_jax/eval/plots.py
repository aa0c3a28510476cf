"""Figures from a run directory: score vs k under aligned / shifted demonstrations (paper Fig. 4)
and score vs re-optimisation interval with the baseline dashed (Fig. 6). matplotlib is optional
and imported only when drawing; the series functions are plain data.

    plot_context_shift("runs/x", "fig4.png")   # methods baseline, rewire, icl:K[+rewire], shift:K[+rewire]
    plot_interval("runs/x", "fig6.png")        # methods baseline, rewire, rewire:interval=M (continuous=false: 'none')

The command line: `rewire-jax eval plot RUN_DIR --kind context-shift|interval --out FIG.png`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

from rewire_jax import RewireOptions

from .methods import parse_method

CURVES = ("Base-Aligned", "Base-Shifted", "Ours-Aligned", "Ours-Shifted")   # the paper's legend


def _score(cell: dict) -> float:
    return 100.0 * cell["score"]


def context_shift_series(res: dict) -> dict:
    """{task: {curve: [(k, score %), ...] sorted by k}} from `report.summarize` output. Only methods
    made of the parts baseline, rewire, icl:K, shift:K count; k = 0 (baseline / rewire) starts both
    the aligned and the shifted curve of its arm."""
    out = {}
    for task, cells in res["tasks"].items():
        curves = {c: {} for c in CURVES}
        for name, cell in cells.items():
            parts = [p.strip() for p in name.split("+")]
            if not all(re.fullmatch(r"baseline|rewire|(icl|shift):\d+", p) for p in parts):
                continue
            m = parse_method(name)
            arm = "Ours" if m.rewire is not None else "Base"
            settings = ["Aligned"] if m.icl else ["Shifted"] if m.shift else ["Aligned", "Shifted"]
            for s in settings:
                k = m.icl or m.shift
                if k in curves[f"{arm}-{s}"]:
                    raise ValueError(f"{task}: two methods give {arm}-{s} at k={k}: {name!r} and another")
                curves[f"{arm}-{s}"][k] = _score(cell)
        series = {c: sorted(v.items()) for c, v in curves.items() if v}
        if series:
            out[task] = series
    return out


def interval_series(res: dict, base: RewireOptions) -> dict:
    """{task: {"rewire": [(interval, score %)], "baseline": score % | None, "none": score % | None}}:
    the rewire methods whose options differ from the run's `base` only in `interval` (and
    `continuous=false`: "none", no re-optimisation after the prompt); no icl/shift/sc parts."""
    out = {}
    for task, cells in res["tasks"].items():
        pts, entry = {}, {"baseline": None, "none": None}
        for name, cell in cells.items():
            if name == "baseline":
                entry["baseline"] = _score(cell)
                continue
            try:
                m = parse_method(name, base)
            except ValueError:
                continue   # a method of another engineer's kind: not part of this figure
            if m.rewire is None or m.icl or m.shift or m.sc:
                continue
            if dataclasses.replace(m.rewire, interval=base.interval, continuous=base.continuous) != base:
                continue
            if not m.rewire.continuous:
                entry["none"] = _score(cell)
            elif m.rewire.interval in pts:
                raise ValueError(f"{task}: methods {pts[m.rewire.interval][0]!r} and {name!r} both run interval "
                                 f"{m.rewire.interval}")
            else:
                pts[m.rewire.interval] = (name, _score(cell))
        entry["rewire"] = [(i, s) for i, (_, s) in sorted(pts.items())]
        if entry["rewire"] or entry["none"] is not None:
            out[task] = entry
    return out


def run_summary(run_dir) -> tuple:
    """(summarize(records), the run's base RewireOptions from config.json)."""
    from .report import load_dir_records, summarize

    recs = load_dir_records(run_dir)
    if not recs:
        raise ValueError(f"no samples*.jsonl records in {run_dir}")
    cfg = Path(run_dir) / "config.json"
    base = RewireOptions(**json.loads(cfg.read_text()).get("rewire", {})) if cfg.exists() else RewireOptions()
    return summarize(recs), base


def _figure(n: int, width: float = 4.2):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width * n, 3.4), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _save(fig, out: Optional[str]):
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    return fig


def plot_context_shift(run_dir=None, out: Optional[str] = None, series: Optional[dict] = None):
    """Fig. 4: score vs number of demonstrations, one panel per task; returns the Figure."""
    series = series if series is not None else context_shift_series(run_summary(run_dir)[0])
    if not series:
        raise ValueError("no context-shift methods (baseline, rewire, icl:K[+rewire], shift:K[+rewire]) in the run")
    fig, axes = _figure(len(series))
    style = {"Base-Aligned": ("tab:blue", "--", "o"), "Base-Shifted": ("tab:blue", ":", "s"),
             "Ours-Aligned": ("tab:red", "-", "o"), "Ours-Shifted": ("tab:red", "-.", "s")}
    for ax, (task, curves) in zip(axes, series.items()):
        for name, pts in curves.items():
            c, ls, mk = style[name]
            dx = 0.03 * (CURVES.index(name) - 1.5)   # a small sideways dodge: equal scores stay visible
            ax.plot([k + dx for k, _ in pts], [s for _, s in pts], color=c, linestyle=ls, marker=mk, label=name)
        ks = sorted({k for pts in curves.values() for k, _ in pts})
        ax.set(title=task, xlabel="few-shot examples (k)", ylabel="score (%)", xticks=ks)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_interval(run_dir=None, out: Optional[str] = None, series: Optional[dict] = None):
    """Fig. 6: score vs re-optimisation interval (rewire), the baseline as a dashed line."""
    series = series if series is not None else interval_series(*run_summary(run_dir))
    if not series:
        raise ValueError("no interval-sweep methods (rewire, rewire:interval=M, rewire:continuous=false) in the run")
    fig, axes = _figure(len(series))
    for ax, (task, e) in zip(axes, series.items()):
        xs = [i for i, _ in e["rewire"]]
        ticks, labels = list(xs), [str(i) for i in xs]
        if e["none"] is not None:   # no re-optimisation: drawn right of the largest interval
            x_none = (max(xs) * 1.5) if xs else 1
            ax.plot([x_none], [e["none"]], "D", color="tab:gray", label="no updates")
            ticks.append(x_none)
            labels.append("none")
        ax.plot(xs, [s for _, s in e["rewire"]], "o-", color="tab:red", label="rewire")
        if e["baseline"] is not None:
            ax.axhline(e["baseline"], color="k", linestyle="--", label="baseline")
        ax.set_xticks(ticks, labels)
        ax.set(title=task, xlabel="optimisation interval m (tokens)", ylabel="score (%)")
        ax.legend(fontsize=8)
    return _save(fig, out)
