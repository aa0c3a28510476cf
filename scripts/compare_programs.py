"""Are two checkouts compiling the same XLA programs? A refactor that leaves every program identical
cannot change speed or values (only trace time in Python).

    python scripts/compare_programs.py OLD_CHECKOUT NEW_CHECKOUT

Runs the same workload in each checkout (the demo model: rewired `generate` of two prompts, 40 new
tokens, a phase every 16; `generate_queue` of two prompts, rewired every 8), with XLA dumping every
program before optimisation, then compares the programs with source locations and metadata removed.
Uses the running interpreter (its venv must import both checkouts' dependencies).
"""
from __future__ import annotations

import collections
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile

WORKLOAD = """
import rewire_jax
m = rewire_jax.load(rewire_jax.__path__[0] + "/demo/model")
r = rewire_jax.generate(m, [m.encode("def fibonacci(n):"), m.encode("import os\\n")], max_new_tokens=40,
                        rewire=rewire_jax.RewireOptions(interval=16))
q = rewire_jax.generate_queue(m, [m.encode("def add(a, b):"), m.encode("class A:")], max_new_tokens=24,
                              rewire=rewire_jax.RewireOptions(interval=8), batch_size=2)
print(r.tokens, q.tokens)
"""
TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def normalise(text: str) -> str:
    """An HLO dump without its module name, source-location tables and op metadata."""
    keep, skip = [], False
    for line in text.splitlines():
        if line in TABLES:
            skip = True
        elif skip and not line.strip():
            skip = False
        elif not skip:
            keep.append(line)
    text = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(keep))
    return re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)


def run(checkout: str, dump: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout),
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    r = subprocess.run([sys.executable, "-c", WORKLOAD], cwd=checkout, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"workload failed in {checkout}:\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def programs(dump: str) -> collections.Counter:
    out = collections.Counter()
    for f in glob.glob(os.path.join(dump, "*before_optimizations.txt")):
        name = os.path.basename(f).split(".")[1]
        out[name, hashlib.sha256(normalise(open(f).read()).encode()).hexdigest()[:12]] += 1
    return out


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = [run(c, os.path.join(tmp, str(i))) for i, c in enumerate(sys.argv[1:])]
        old, new = (programs(os.path.join(tmp, str(i))) for i in range(2))
    same = sum((old & new).values())
    print(f"programs: old {sum(old.values())}, new {sum(new.values())}, identical {same}")
    for (name, h), n in sorted((old - new).items()):
        print(f"  only old: {name} {h} x{n}")
    for (name, h), n in sorted((new - old).items()):
        print(f"  only new: {name} {h} x{n}")
    print("tokens equal" if tokens[0] == tokens[1] else "tokens DIFFER")
    return 0 if old == new and tokens[0] == tokens[1] else 1


if __name__ == "__main__":
    sys.exit(main())
