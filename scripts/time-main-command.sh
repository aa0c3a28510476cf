#!/usr/bin/env bash
# Times the README's main command as a newcomer runs it: 3 runs cold (an empty compile cache each),
# then 3 warm (the cache the last cold run wrote), with /usr/bin/time -v, the compile cache's entry
# count after each run (a warm run that adds entries missed the cache) and the load average.
#   bash scripts/time-main-command.sh [path/to/rewire-jax]      (default: .venv/bin/rewire-jax)
set -euo pipefail
cd "$(dirname "$0")/.."
exe=${1:-.venv/bin/rewire-jax}
xdg=$(mktemp -d)   # stands in for ~/.cache: the per-user compile cache lands under it
trap 'rm -rf "$xdg"' EXIT
unset REWIRE_JAX_COMPILE_CACHE JAX_COMPILATION_CACHE_DIR
echo "$(date -u '+%F %T UTC') $(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for kind in cold cold cold warm warm warm; do
  [ "$kind" = cold ] && rm -rf "${xdg:?}"/*
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  XDG_CACHE_HOME=$xdg /usr/bin/time -v "$exe" generate --prompt "def fibonacci(n):" --compare \
    >/dev/null 2>"$xdg.err" || { cat "$xdg.err" >&2; exit 1; }
  wall=$(grep -F 'Elapsed (wall' "$xdg.err" | awk '{print $NF}')
  user=$(grep -F 'User time' "$xdg.err" | awk '{print $NF}')
  entries=$(find "$xdg" -name '*-cache' -type f | wc -l)   # a warm run that adds entries missed the cache
  echo "$kind: wall $wall, user ${user}s, cache entries $entries, load before $load, after $(cut -d' ' -f1-3 /proc/loadavg)"
done
rm -f "$xdg.err"
