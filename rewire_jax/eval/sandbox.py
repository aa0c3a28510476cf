"""Run untrusted generated code, contained (see `_launcher.py` for the mechanisms).

    res = run_program(source, timeout_s=10)        # -> ExecResult(passed, result, ...)
    results = run_many([src1, src2, ...], workers=4)

A program passes only if it ran to its end: the harness appends a footer that writes a fresh random
nonce to fd 3 after the tests, and requires both the nonce and exit status 0. A program that
exits early with status 0 (`sys.exit(0)`, `os._exit(0)`), kills itself or its parent, times out or
hits a limit fails. What is NOT protected: the program can read any world-readable file on the
host (the filesystem is not hidden, only /tmp, /var/tmp and /dev/shm are replaced by fresh tmpfs),
it can use CPU up to the limits during the timeout, and a program that deliberately reads its own
source to forge the nonce could fake a pass (the nonce guards against accidents, not adversaries).
Without root none of the namespaces nor the uid switch apply (only rlimits, process group, timeout).
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

LAUNCHER = Path(__file__).with_name("_launcher.py")
UID_BASE = 61000   # sandbox slot i runs as uid/gid UID_BASE + i (need not exist in /etc/passwd)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits. processes: RLIMIT_NPROC for the sandbox uid (all its processes)."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    address_space: int = 1 << 30
    file_size: int = 16 << 20
    processes: int = 16
    open_files: int = 64


@dataclasses.dataclass
class ExecResult:
    """passed: ran to its end with status 0. result: 'passed' | 'timed out' | 'failed: <why>'."""

    passed: bool
    result: str
    output: str
    protections: list


def _world_executable(path: str) -> bool:
    p = Path(path).resolve()
    if not os.access(p, os.X_OK) or not (p.stat().st_mode & 0o001):
        return False
    return all(d.stat().st_mode & 0o001 for d in p.parents)


def sandbox_python() -> str:
    """An interpreter the unprivileged sandbox uid can execute (every directory world-traversable):
    env REWIRE_JAX_SANDBOX_PYTHON, else this interpreter, else /usr/bin/python3."""
    cands = [os.environ.get("REWIRE_JAX_SANDBOX_PYTHON"), getattr(sys, "_base_executable", None),
             sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in cands:
        if c and os.path.exists(c) and (os.geteuid() != 0 or _world_executable(c)):
            return str(Path(c).resolve()) if os.geteuid() == 0 else c
    raise RuntimeError("no Python interpreter executable by an unprivileged uid; set REWIRE_JAX_SANDBOX_PYTHON")


def with_footer(source: str, nonce: str) -> str:
    """Append the end-of-program proof: writes the nonce to fd 3 once everything before ran."""
    return f"{source}\n\nimport os as _rj_os\n_rj_os.write(3, b{nonce!r})\n"


def _error_line(output: str) -> str:
    """The exception line of a traceback ('AssertionError', 'NameError: name x ...'), or ''."""
    for ln in reversed(output.strip().splitlines()):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b", ln.strip()):
            return ln.strip()[:200]
    return ""


def classify(rep: dict) -> tuple[bool, str]:
    """Launcher report -> (passed, result string)."""
    if rep["status"] == "timeout":
        return False, "timed out"
    code = rep["code"]
    if rep["status"] == "signalled" or (code is not None and 128 < code < 160):
        num = rep["signal"] if rep["status"] == "signalled" else code - 128
        name = signal.Signals(num).name if num in signal.Signals._value2member_map_ else str(num)
        why = {"SIGXFSZ": "output/file size limit", "SIGXCPU": "CPU time limit", "SIGKILL": "killed"}.get(name, "")
        return False, f"failed: signal {name}" + (f" ({why})" if why else "")
    if code == 255:
        return False, "failed: the program's parent process was killed (or exit status 255)"
    if code == 254:
        return False, "failed: sandbox setup error: " + _error_line(rep["output"])
    if rep["marker"] and code == 0:
        return True, "passed"
    if rep["code"] == 0:
        return False, "failed: exited before the tests finished (status 0)"
    err = _error_line(rep["output"])
    return False, f"failed: {err}" if err else f"failed: exit status {rep['code']}"


def run_program(source: str, limits: Limits = Limits(), slot: int = 0, python: Optional[str] = None) -> ExecResult:
    """Run `source` (full program: code + tests) in the sandbox as uid UID_BASE + slot."""
    nonce = secrets.token_hex(16)
    cfg = {"limits": dataclasses.asdict(limits), "timeout_s": limits.timeout_s, "uid": UID_BASE + slot,
           "gid": UID_BASE + slot, "python": python or sandbox_python(), "marker": nonce, "output_tail": 4000}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    try:
        out, err = proc.communicate(with_footer(source, nonce).encode(), timeout=limits.timeout_s + 30)
    except subprocess.TimeoutExpired:   # the launcher itself hung: kill its group (PDEATHSIG takes the rest)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return ExecResult(False, "timed out", "", [])
    try:
        rep = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return ExecResult(False, f"failed: sandbox error: {err.decode()[-300:]}", "", [])
    passed, result = classify(rep)
    return ExecResult(passed, result, rep["output"], rep["protections"])


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int = 0,
             python: Optional[str] = None) -> list[ExecResult]:
    """Run programs in parallel (threads driving launcher processes), results in input order.
    workers 0: min(8, cpu count). Each worker owns one sandbox uid, so process budgets don't mix."""
    workers = workers or min(8, os.cpu_count() or 1)
    python = python or sandbox_python()
    slots: queue.Queue = queue.Queue()
    for i in range(workers):
        slots.put(i)

    def one(src):
        s = slots.get()
        try:
            return run_program(src, limits, s, python)
        finally:
            slots.put(s)

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, sources))


def uid_processes(uid: int) -> list[int]:
    """Pids of live processes whose real uid is `uid` (to check that nothing survived a sample)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        pids.append(int(d.name))
            except (OSError, ValueError):
                pass
    return pids
