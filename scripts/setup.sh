#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with rewire-jax installed (editable).
#   bash scripts/setup.sh                   # library + CLI (enough for the main job)
#   bash scripts/setup.sh --test            # + torch==2.13.0 (CPU wheel; HF reference models) + test,
#                                           #   notebook, eval, docs, serve and accel extras
#   bash scripts/setup.sh [--test] --latest # the same, resolved fresh instead of pinned
# Both modes install with the pins of constraints.txt (the versions CI passes with) unless --latest;
# scripts/update_constraints.sh refreshes them. torch is installed pinned and *before* the package so
# that nothing can pull a newer CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
test=0 latest=0
for arg in "$@"; do
  case "$arg" in
    --test) test=1 ;;
    --latest) latest=1 ;;
    *) echo "unknown option $arg (use --test and/or --latest)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$latest" = 1 ]; then
  pins=(-U --upgrade-strategy eager -c /dev/stdin)   # fresh resolution; only torch stays pinned
else
  pins=(-c constraints.txt)
fi
if [ "$test" = 1 ]; then
  .venv/bin/pip install -q torch==2.13.0
  echo torch==2.13.0 | .venv/bin/pip install -q "${pins[@]}" -e '.[test,notebooks,eval,docs,serve,accel]'
else
  echo torch==2.13.0 | .venv/bin/pip install -q "${pins[@]}" -e .
fi
