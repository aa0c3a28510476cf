"""The table of scripts/ab_decode.sh: decode ms/token of two commits from its JSON files.

    python scripts/ab_decode_table.py OUT_DIR
"""
import json
import sys
from pathlib import Path


def bench_ms(path: Path, label: str) -> float:
    """Decode ms per token of `python -m rewire_jax.bench`'s rewire_jax row `label` (batch 1)."""
    rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    r = rows[f"rewire_jax {label} (float32)"]
    return 1e3 * r["decode"] / r["tokens"]


def batch_ms(path: Path, batch: int, label: str) -> float:
    """Decode ms per step (all rows of the batch) of the batch table's OLMoE-shaped row."""
    row = next(r for r in json.loads(path.read_text())["rows"] if r["batch"] == batch)
    return 1e3 * row[label]["decode"] / row["new_tokens"]


def main(out: Path) -> None:
    commits = {k: (out / f"{k}.commit").read_text().strip() for k in ("before", "after")}
    rounds = sorted({p.stem.rsplit("_", 1)[1] for p in out.glob("bench_before_*.json")})
    measures = [("bench, baseline decode, ms/token (batch 1)", lambda r, k: bench_ms(out / f"bench_{k}_{r}.json", "baseline")),
                ("bench, rewired decode, ms/token (batch 1)", lambda r, k: bench_ms(out / f"bench_{k}_{r}.json", "rewired"))]
    for b in (1, 16):
        for label in ("baseline", "rewired"):
            measures.append((f"batch table, {label} decode, ms/step (batch {b})",
                             lambda r, k, b=b, label=label: batch_ms(out / f"batch_{k}_{r}.json", b, label)))
    print(f"before = {commits['before']}, after = {commits['after']}; after / before < 1 is faster")
    print("| measure | " + " | ".join(f"round {r}: before / after / ratio" for r in rounds) + " |")
    print("|---|" + "---|" * len(rounds))
    for name, fn in measures:
        cells = []
        for r in rounds:
            try:
                b, a = fn(r, "before"), fn(r, "after")
                cells.append(f"{b:.2f} / {a:.2f} / {a / b:.2f}")
            except (KeyError, StopIteration, FileNotFoundError):
                cells.append("missing")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ab_decode_out"))
