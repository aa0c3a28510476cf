#!/usr/bin/env bash
# The accelerator profile on a bare GPU / TPU machine, in one command (from the repo root):
#
#   OUT=/tmp/out bash scripts/device_check.sh                 # venv + jax for the device, then the profile
#   OUT=/tmp/out bash scripts/device_check.sh --with-scan     # also cold compile vs depth, scan vs unrolled
#   OUT=/tmp/out bash scripts/device_check.sh --no-setup --backend cpu --shape tiny --dtype float32 \
#       --batches 2 --prompt-lens 8 20 --new-tokens 8 --interval 4 --bandwidth-mb 16 --peak-sizes 128 256
#                                                             # on CPU with the current python (the CI test)
#
# Setup: a venv in /tmp/rewire-venv with `pip install -e .[cuda]` (`.[tpu]` where /dev/accel* or
# /dev/vfio exists), plus every optional extra of pyproject.toml that pulls a kernel library
# (tokamax) where there is one; a failed install of that extra is reported and skipped. If the
# install fails altogether (no package index reachable) the current python is used when it imports
# jax. Writes under $OUT (default /tmp/out): profile.json and profile.txt (`python -m
# rewire_jax.bench.accelerator`, the arguments after the script's own flags passed to it), env.txt
# (versions, devices) and, with --with-scan, compile_time.json and scan_speed.txt. The profile runs
# under `timeout` (PROFILE_TIMEOUT seconds, default 420) and rewrites its JSON after every section.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
SETUP=1 SCAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-setup) SETUP=0; shift ;;
    --with-scan) SCAN=1; shift ;;
    *) break ;;
  esac
done
PY="${PYTHON:-python3}"

if [ "$SETUP" = 1 ]; then
  EXTRA=cuda
  if ls /dev/accel* >/dev/null 2>&1 || [ -e /dev/vfio ]; then EXTRA=tpu; fi
  # optional extras whose requirements name a kernel library (e.g. a `kernels = ["tokamax"]` extra)
  KERN=$("$PY" - <<'EOF' 2>/dev/null
import re   # no tomllib: python 3.10 has none
sec = open("pyproject.toml").read().split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
print(",".join(m.group(1) for m in re.finditer(r"^([\w-]+)\s*=(.*?)(?=^[\w-]+\s*=|\Z)", sec, re.M | re.S)
               if "tokamax" in m.group(2)))
EOF
)
  if "$PY" -m venv /tmp/rewire-venv && . /tmp/rewire-venv/bin/activate && pip install -q -e ".[$EXTRA]"; then
    PY=python
    if [ -n "$KERN" ]; then
      pip install -q -e ".[$EXTRA,$KERN]" || echo "device_check: the kernel extra [$KERN] did not install; profiling without it"
    fi
  else
    echo "device_check: could not install .[$EXTRA] (no package index?); using $PY as it is"
    deactivate 2>/dev/null || true
    PY="${PYTHON:-python3}"
  fi
fi

{ "$PY" -c "import jax, sys; print(sys.version); print('jax', jax.__version__, jax.devices())"
  "$PY" -m pip freeze 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|libtpu|tokamax|flax)" ; } | tee "$OUT/env.txt"

timeout "${PROFILE_TIMEOUT:-420}" "$PY" -m rewire_jax.bench.accelerator --json "$OUT/profile.json" \
  --table "$OUT/profile.txt" "$@"
rc=$?
if [ "$SCAN" = 1 ]; then
  timeout 240 "$PY" -m rewire_jax.bench.compile_time --layers 8 32 --json "$OUT/compile_time.json"
  timeout 200 "$PY" scripts/scan_speed.py | tee "$OUT/scan_speed.txt"
fi
exit $rc
