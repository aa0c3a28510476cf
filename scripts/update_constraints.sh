#!/usr/bin/env bash
# Refresh constraints.txt (the pins scripts/setup.sh installs with) from a virtualenv that passes CI.
#   bash scripts/setup.sh --test --latest                  # resolve everything fresh into .venv
#   .venv/bin/python -m pytest -q -n 2 --dist loadfile     # the README's test command: must pass
#   bash scripts/update_constraints.sh [VENV]              # then pin what it installed (default .venv)
# The editable rewire-jax itself is left out, and torch's local label (+cpu) is dropped so the
# pin matches the CPU wheel (torch must stay exactly 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
[ -x "$venv/bin/pip" ] || { echo "no virtualenv at $venv: run bash scripts/setup.sh --test --latest first" >&2; exit 2; }
tmp=$(mktemp constraints.txt.XXXXXX)
{
  echo "# Versions CI passes with (CPU). Used by scripts/setup.sh via -c; --latest ignores them."
  echo "# Refresh: bash scripts/update_constraints.sh (see its header). Written $(date -u +%Y-%m-%d)."
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" freeze --exclude-editable \
    | grep -v -i '^rewire[-_]jax[ =@]' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'
} > "$tmp"
grep -qx 'torch==2.13.0' "$tmp" || { rm -f "$tmp"; echo "torch is not 2.13.0 in $venv; refusing to pin it" >&2; exit 2; }
mv "$tmp" constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
