"""`rewire-jax chat` driven in a real terminal (a pty via pexpect): start, two turns, /deltas,
/save, /quit; restart with --state and continue the conversation; Ctrl-C stops a reply and keeps
the conversation; bad commands are clear errors."""
import os
import signal
import sys
from pathlib import Path

import pytest

import rewire_jax
from rewire_jax import Conversation

pexpect = pytest.importorskip("pexpect")
ROOT = Path(rewire_jax.__file__).parent.parent
ARGS = ["-m", "rewire_jax.cli", "chat", "--max-new-tokens", "6", "--interval", "4", "--steps", "2"]
TIMEOUT = 600   # a cold start compiles the phase, prefill and decode programs


def _default_sigint():
    """A terminal user's Ctrl-C: a test run started in the background (`cmd &` in a script) ignores
    SIGINT, and the child would inherit that and never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(*extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", JAX_PLATFORMS="cpu")
    child = pexpect.spawn(sys.executable, ARGS + list(extra), env=env, encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(40, 160), preexec_fn=_default_sigint)
    child.expect("/help for commands")
    child.banner = child.before     # what the start printed (e.g. "loaded 2 turns from ...")
    child.expect_exact("you> ")
    return child


def _turn(child, text):
    child.sendline(text)
    child.expect(r"\[(\d+) tokens; (\d+) phases")
    n_phases = int(child.match.group(2))
    child.expect_exact("you> ")
    return n_phases


def test_repl_two_turns_deltas_save_restart_continue(tmp_path):
    state = tmp_path / "chat"
    child = _spawn("--state", str(state))
    assert _turn(child, "def add(a, b):") >= 1
    assert _turn(child, "now multiply") >= 1
    child.sendline("/deltas")
    child.expect(r"layer\s+norm\s+pushed up\s+pushed down")
    child.expect(r"\n\s+0\s+\d+\.\d{4}\s+e\d+:[+-]")
    child.expect_exact("you> ")
    child.sendline("/options learning_rate=1")
    child.expect("unknown rewiring option 'learning_rate'")
    child.expect_exact("you> ")
    child.sendline("/options lr=0.02")
    child.expect("lr=0.02")
    child.expect_exact("you> ")
    child.sendline("/save")
    child.expect(f"saved 2 turns to {state}")
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = _spawn("--state", str(state))
    assert f"loaded 2 turns from {state}" in child.banner
    assert _turn(child, "and divide") >= 1
    child.sendline("/save")
    child.expect("saved 3 turns")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    model = rewire_jax.load(ROOT / "rewire_jax" / "demo" / "model")
    conv = Conversation.load(model, state)
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["def add(a, b):", "now multiply",
                                                                          "and divide"]
    assert conv.options.lr == 0.02 and conv.state.turns == 3


def test_repl_errors_and_empty_lines(tmp_path):
    child = _spawn("--max-new-tokens", "96")   # a long reply (24 phases): Ctrl-C lands while it streams
    child.sendline("")
    child.expect_exact("you> ")
    child.sendline("/save")
    child.expect("needs a directory")
    child.expect_exact("you> ")
    (tmp_path / "junk").mkdir()
    child.sendline(f"/load {tmp_path / 'junk'}")
    child.expect("not a saved conversation")
    child.expect_exact("you> ")
    child.sendline("/frobnicate")
    child.expect("unknown command /frobnicate")
    child.expect_exact("you> ")
    child.sendline("def slow():")
    child.expect_exact("def slow():\r\n")
    # the reply's first piece: input() has returned and the reply is streaming
    child.expect(r"[\s\S]")
    child.sendintr()
    stopped = "[stopped: the conversation is as it was before this message]"
    i = child.expect_exact([stopped, "tokens; "])
    assert i == 0, "the reply ended before the interrupt reached it: " + child.before[-300:]
    child.expect_exact("you> ")
    child.sendline("/deltas")         # still no turns: all deltas are zero
    child.expect(r"\n\s+0\s+0\.0000\s")
    child.expect_exact("you> ")
    child.sendline("/baseline")
    child.expect("rewiring off")
    child.expect_exact("you> ")
    assert _turn(child, "def f():") == 0      # baseline: no phase
    child.sendeof()
    child.expect(pexpect.EOF)
