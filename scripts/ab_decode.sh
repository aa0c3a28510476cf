#!/usr/bin/env bash
# CPU decode of two commits, back to back: `python -m rewire_jax.bench --torch-repeats 0` and the batch
# table of the benchmark (OLMoE-shaped) model at batch 1 and 16, each commit in turn, twice (A B A B), so
# that a drift of the machine's speed shows as a difference between the two rounds, not between commits.
#
#   bash scripts/ab_decode.sh BEFORE [AFTER] [OUT_DIR]     # AFTER defaults to HEAD
#
# Each commit runs from a temporary git worktree with this checkout's environment (.venv) and
# PYTHONPATH pointing at the worktree. Ends with a table of decode ms/token (scripts/ab_decode_table.py).
set -euo pipefail
before=${1:?usage: bash scripts/ab_decode.sh BEFORE [AFTER] [OUT_DIR]}
after=${2:-HEAD}
root=$(git rev-parse --show-toplevel)
out=${3:-$root/ab_decode_out}
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'for w in "$tmp"/*/; do git -C "$root" worktree remove --force "$w" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
for label in before after; do
  ref=$([ $label = before ] && echo "$before" || echo "$after")
  git -C "$root" worktree add --detach "$tmp/$label" "$ref" >/dev/null
  git -C "$root" rev-parse --short "$ref" > "$out/$label.commit"
done
export TRANSFORMERS_VERBOSITY=error GLIBC_TUNABLES=glibc.malloc.hugetlb=1
for round in 1 2; do
  for label in before after; do
    echo "== round $round: $label ($(cat "$out/$label.commit")), load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$tmp/$label" && PYTHONPATH="$tmp/$label" "$py" -m rewire_jax.bench --torch-repeats 0 \
        --json "$out/bench_${label}_$round.json" > "$out/bench_${label}_$round.log" 2>&1)
    (cd "$tmp/$label" && PYTHONPATH="$tmp/$label" "$py" -m rewire_jax.bench.batch --models olmoe \
        --batches 1 16 --queue-prompts 0 --skip-hf --json "$out/batch_${label}_$round.json" \
        > "$out/batch_${label}_$round.log" 2>&1)
  done
done
"$py" "$root/scripts/ab_decode_table.py" "$out"
