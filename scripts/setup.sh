#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with rewire-jax installed (editable).
#   bash scripts/setup.sh          # library + CLI (enough for the main job)
#   bash scripts/setup.sh --test   # + torch==2.13.0 (CPU wheel; HF reference models) + test, notebook, eval extras
# torch is installed pinned and *before* the package so that nothing can pull a newer CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test,notebooks,eval]'
else
  .venv/bin/pip install -q -e .
fi
