"""The benchmarks' restart under transparent huge pages (rewire_jax/hugepages.py)."""
import json
import subprocess
import sys
import textwrap

import pytest

from rewire_jax import hugepages

# a child that restarts itself like the benchmarks' __main__, then mallocs and touches 256 MiB
# through glibc (as XLA's and torch's CPU allocators do) and reports its huge pages
CHILD = textwrap.dedent("""
    import ctypes, json, sys
    from rewire_jax import hugepages
    hugepages.reexec_with_hugepages([sys.argv[0], *sys.argv[1:]])
    before = hugepages.anon_huge_kib()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 256 << 20
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    print(json.dumps({**hugepages.describe(), "gained_kib": hugepages.anon_huge_kib() - before}))
""")


def _child(tmp_path, *args):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in __import__("os").environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.skipif(hugepages.thp_mode() != "madvise" or not hugepages._glibc_supports_hugetlb(),
                    reason="needs Linux with THP in madvise mode and glibc >= 2.35")
def test_restart_puts_mallocd_memory_on_huge_pages(tmp_path):
    on, err = _child(tmp_path)
    assert on["glibc_hugetlb"] and "restarting with GLIBC_TUNABLES" in err
    assert on["gained_kib"] >= 128 << 10, on          # most of the 256 MiB on 2 MiB pages
    off, err = _child(tmp_path, hugepages.OPT_OUT)     # opted out: the process is kept as started
    assert not off["glibc_hugetlb"] and "restarting" not in err
    assert off["gained_kib"] < 16 << 10, off


def test_describe_and_summary():
    d = hugepages.describe()
    assert set(d) == {"thp_mode", "glibc_hugetlb", "anon_huge_pages_kib"}
    assert "huge-page tunable" in hugepages.summary(d)
