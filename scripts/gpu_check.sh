#!/usr/bin/env bash
# One-shot accelerator check of the scanned layers (run on a GPU machine from the repo root):
# venv, then cold compile vs depth, then scan vs unrolled decode / prefill / phase on the benchmark model.
set -uo pipefail
python3 -m venv /tmp/venv >/dev/null && . /tmp/venv/bin/activate
pip install -q "jax[cuda12]" >/dev/null 2>&1 || pip install -q "jax[cuda]" >/dev/null 2>&1
pip install -q -e '.[accel]' >/dev/null 2>&1 || pip install -q -e . >/dev/null 2>&1   # accel: tokamax kernels
python -c "import jax; print(jax.__version__, jax.devices())"
mkdir -p "${OUT:-/tmp/out}"
timeout 240 python -m rewire_jax.bench.compile_time --layers 8 32 --json "${OUT:-/tmp/out}/compile_time.json"
timeout 200 python scripts/scan_speed.py | tee "${OUT:-/tmp/out}/scan_speed.txt"
