"""Transparent huge pages for CPU processes (Linux, glibc >= 2.35).

With the kernel's THP mode at `madvise` (a common default), XLA:CPU's buffers and the weights live on
4 KiB pages, and a process can run the same compiled program at one of two speeds, the slower up to
~1.7x (measured on this project's 2-core CPU: the optimise phase at context 512 took 1.35 or 2.0 s,
an OLMoE-shaped batch-16 decode step 25 or 47 ms). Under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
glibc's malloc asks for huge pages (madvise) on its large mappings, which both XLA's and torch's CPU
allocators use; the phase then ran at 1.22-1.29 s in 3 of 3 processes (15 phases), and the decode
step at 24-28 ms. It does not remove every slow process: XLA:CPU's thread scheduling on a shared
2-core VM still gives some (see the README's benchmark section).

glibc reads its tunables at process start, so the command-line entry points (`rewire-jax`,
`python -m rewire_jax.bench`, `python -m rewire_jax.bench.batch`) re-execute themselves once with the
tunable set; `--no-hugepages` keeps the process as started. Library calls never do this: in your own
process, set the variable before Python starts (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`).
In the benchmarks both sides of every comparison run in the same process, so both get the same pages.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "--no-hugepages"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> Optional[str]:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where there is none."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _glibc_supports_hugetlb() -> bool:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    major, minor = (int(v) for v in version.split(".")[:2])
    return (major, minor) >= (2, 35)


def active() -> bool:
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugepages(python_args: list[str], quiet: bool = False) -> None:
    """Replace this process with `python python_args...` (e.g. ["-m", module, *argv]) under the
    huge-page tunable, unless it is already set, the user opted out (`--no-hugepages` among the
    args), or it would do nothing here (not Linux/glibc >= 2.35, or THP off). Call it first thing in a
    `__main__`, never from a library call."""
    if OPT_OUT in python_args or active() or thp_mode() in (None, "never") or not _glibc_supports_hugetlb():
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), TUNABLE) if t)
    if not quiet:
        print(f"[rewire-jax] restarting with GLIBC_TUNABLES={tunables} (transparent huge pages; "
              f"{OPT_OUT} to keep 4 KiB pages)", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *python_args], {**os.environ, "GLIBC_TUNABLES": tunables})


def anon_huge_kib() -> Optional[int]:
    """AnonHugePages of this process in KiB (the proof that the tunable took effect), None if unknown."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe() -> dict:
    return {"thp_mode": thp_mode(), "glibc_hugetlb": active(), "anon_huge_pages_kib": anon_huge_kib()}


def summary(d: dict) -> str:
    huge = d.get("anon_huge_pages_kib")
    return (f"THP mode {d.get('thp_mode')}, glibc huge-page tunable {'on' if d.get('glibc_hugetlb') else 'off'}, "
            f"{'unknown' if huge is None else f'{huge / 1024:.0f} MiB'} of anonymous memory on huge pages")

