"""Evidence experiment: does optimising the router deltas on a document's prefix lower the NLL of
its continuation?

For each evaluation document (held-out stdlib modules; the English pydoc topics as a shifted
domain), split it into a prefix (P tokens) and a continuation (C tokens), all documents batched:
  baseline     deltas 0, continuation NLL teacher-forced
  static       one phase on the prefix, then score the whole continuation with those deltas
  continuous   phase on the prefix, score the next m tokens, re-optimise on prefix + those m
               tokens, score the next m, ... (the paper's cycle, teacher-forced)
and the Table-2 ablations. Prints mean continuation NLL (nats/token) and the paired difference to
the baseline with standard errors over documents. Nothing is tuned on these documents: the options
are the paper's defaults.

    python -m rewire_jax.experiments.heldout_nll [--model DIR] [--prefix 256 --cont 128 --interval 32]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..api import Model, load
from ..demo import DEMO_MODEL
from ..model import forward, span_nll as _span_nll, zero_deltas
from ..rewire import RewireOptions, run_phase, start_cycle

ABLATIONS: dict[str, Optional[dict]] = {
    "baseline (deltas 0)": None,
    "soft (paper default)": {},
    "soft, prefix only (w/o continuous)": dict(continuous=False),
    "hard": dict(selection="hard"),
    "all layers": dict(selection="all"),
    "random layers": dict(selection="random"),
    "reverse metric": dict(selection="reverse"),
    "last-k layers": dict(selection="last_k"),
    "soft, confidence=inverse": dict(confidence="inverse"),
    "hard, confidence=inverse": dict(selection="hard", confidence="inverse"),
    "soft, soft_mode=grad": dict(soft_mode="grad"),
}


@functools.partial(jax.jit, static_argnames=("cfg",))
def span_nll(params, tokens, deltas, start, stop, cfg):
    """Mean NLL per document of the targets tokens[:, start:stop] (teacher-forced). -> [B]"""
    return _span_nll(forward(params, tokens, deltas, cfg)[0], tokens, start, stop)


def evaluate(model: Model, docs: np.ndarray, prefix: int, interval: int, options: Optional[RewireOptions]) -> np.ndarray:
    """docs [B, prefix + cont] -> continuation NLL per document [B]."""
    cfg, params = model.config, model.params
    B, total = docs.shape
    tokens = jnp.asarray(docs)
    deltas = zero_deltas(cfg, B)
    if options is None:
        return np.asarray(span_nll(params, tokens, deltas, prefix, total, cfg))
    state, nll_sum, start = start_cycle(cfg, options, B), np.zeros(B), prefix
    while start < total:   # the cycle, teacher-forced: phase on the text so far, score the next span
        state, _ = run_phase(params, state, docs[:, :start], np.full(B, start), cfg, options)
        stop = min(start + interval, total) if options.wants_phase(state.phase_index) else total
        nll_sum += np.asarray(span_nll(params, tokens, state.deltas, start, stop, cfg)) * (stop - start)
        start = stop
    return nll_sum / (total - prefix)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def document_sets(model: Model, prefix: int, cont: int, max_docs: int) -> dict[str, np.ndarray]:
    from ..demo import corpus, data

    n = prefix + cont
    code = data.documents(model.tokenizer, corpus.heldout_files(), n, n)[:max_docs]
    prose = data.text_documents(model.tokenizer, list(corpus.prose_topics().values()), n, n)[:max_docs]
    return {"held-out stdlib code": np.stack(code), "pydoc prose (shifted domain)": np.stack(prose)}


def run(model: Model, sets: dict[str, np.ndarray], prefix: int, interval: int, steps: int, lr: float,
        ablations=ABLATIONS, batch: int = 16, log=print) -> dict:
    results: dict = {}
    for name, kw in ablations.items():
        opts = None if kw is None else RewireOptions(steps=steps, lr=lr, interval=interval, **kw)
        t0 = time.perf_counter()
        results[name] = {}
        for set_name, docs in sets.items():
            parts = [evaluate(model, docs[i:i + batch], prefix, interval, opts) for i in range(0, len(docs), batch)]
            results[name][set_name] = np.concatenate(parts)
        log(f"  {name:38s} {time.perf_counter() - t0:6.1f}s")
    return results


def table(results: dict, sets) -> str:
    base = results["baseline (deltas 0)"]
    head = "| configuration | " + " | ".join(f"{s}: NLL | Δ vs baseline" for s in sets) + " |"
    lines = [head, "|---|" + "---|---|" * len(sets)]
    for name, per_set in results.items():
        cells = []
        for s in sets:
            m, se = _mean_se(per_set[s])
            dm, dse = _mean_se(per_set[s] - base[s])
            cells += [f"{m:.4f} ± {se:.4f}", "—" if per_set is base else f"{dm:+.4f} ± {dse:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewire_jax.experiments.heldout_nll", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--prefix", type=int, default=256, help="prefix tokens (optimised on)")
    p.add_argument("--cont", type=int, default=128, help="continuation tokens (scored)")
    p.add_argument("--interval", type=int, default=32, help="m for the continuous variant")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-docs", type=int, default=48, help="per document set")
    p.add_argument("--only", nargs="*", help="subset of configurations (by name prefix)")
    p.add_argument("--json", help="write per-document NLLs here")
    a = p.parse_args(argv)
    model = load(a.model)
    if model.tokenizer is None:
        print(f"error: {a.model} has no tokenizer", file=sys.stderr)
        return 2
    sets = document_sets(model, a.prefix, a.cont, a.max_docs)
    abl = {k: v for k, v in ABLATIONS.items() if k.startswith("baseline") or not a.only
           or any(k.startswith(o) for o in a.only)}
    print(f"model {a.model}; " + "; ".join(f"{k}: {len(v)} docs" for k, v in sets.items())
          + f"; prefix {a.prefix}, continuation {a.cont}, m {a.interval}, n {a.steps}, lr {a.lr}")
    results = run(model, sets, a.prefix, a.interval, a.steps, a.lr, abl)
    print(table(results, list(sets)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({k: {s: v.tolist() for s, v in r.items()} for k, r in results.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
