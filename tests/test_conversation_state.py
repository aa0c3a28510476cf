"""Conversation persistence: save, kill the process, load, continue = uninterrupted; atomic writes;
foreign, corrupted and missing state directories are refused with clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import rewire_jax
from conversation_helpers import NEW, OPTS, TEMPLATE, TURNS, demo_model
from rewire_jax import Conversation
from rewire_jax.conversation import StateError
from rewire_jax.conversation import state as S


@pytest.fixture(scope="module")
def model():
    return demo_model()


@pytest.fixture(scope="module")
def uninterrupted(model):
    conv = Conversation(model, OPTS, system="tiny helpers", chat_template=TEMPLATE)
    replies = [conv.reply(t, NEW) for t in TURNS]
    return conv, replies


def test_save_kill_load_continues_exactly(model, uninterrupted, tmp_path):
    """A real process: two turns, save, then re-saving in a loop; SIGKILL mid-write; the directory
    loads (the whole old or new state) and the third reply equals the uninterrupted one."""
    out = tmp_path / "chat"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(rewire_jax.__file__).parent.parent),
                                                       str(Path(__file__).parent)]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "conversation_worker.py"), str(out)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "SAVED"
        time.sleep(0.5)   # some overwrites in flight
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    conv, replies = uninterrupted
    loaded = Conversation.load(model, out)
    assert loaded.state.turns == 2 and loaded.messages == conv.messages[:5]
    assert np.abs(loaded.deltas - replies[1].deltas).max() <= 1e-6
    r3 = loaded.reply(TURNS[2], NEW)
    assert r3.tokens == replies[2].tokens and r3.context == replies[2].context
    assert np.abs(r3.deltas - replies[2].deltas).max() <= 1e-6
    # leftovers of the killed write (a partial sibling) never shadow the state
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["chat"]


def test_save_load_roundtrip_in_process(model, uninterrupted, tmp_path):
    conv, _ = uninterrupted
    conv.save(tmp_path / "c")
    back = Conversation.load(model, tmp_path / "c")
    assert back.tokens == conv.tokens and back.messages == conv.messages and back.options == conv.options
    assert back.policy == conv.policy and back.template == conv.template
    assert np.array_equal(back.deltas, conv.deltas)
    for a, b in zip(jax.tree.leaves(back.state.opt_state), jax.tree.leaves(conv.state.opt_state)):
        assert np.array_equal(a, b)


def test_failed_write_leaves_the_previous_state(model, uninterrupted, tmp_path, monkeypatch):
    conv, _ = uninterrupted
    conv.save(tmp_path / "c")
    before = (tmp_path / "c" / "state.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt   # a Ctrl-C in the middle of the write
    monkeypatch.setattr(S.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        conv.save(tmp_path / "c")
    assert (tmp_path / "c" / "state.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_foreign_model_is_refused_naming_both(model, uninterrupted, tmp_path):
    conv, _ = uninterrupted
    conv.save(tmp_path / "c")
    other_params = jax.tree.map(lambda a: a * 1.5, model.params)
    other = rewire_jax.api.Model(model.config, other_params, model.tokenizer, "/models/other-moe")
    with pytest.raises(StateError, match=rf"saved from model {model.path}.*not belong to model /models/other-moe"):
        Conversation.load(other, tmp_path / "c")
    longer = rewire_jax.api.Model(model.config.replace(max_position_embeddings=2048), model.params, model.tokenizer,
                                  "/models/longer")
    with pytest.raises(StateError, match=r"not belong to model /models/longer \(their config differ"):
        Conversation.load(longer, tmp_path / "c")


def test_corrupted_or_missing_state_is_a_clear_error(model, uninterrupted, tmp_path):
    conv, _ = uninterrupted
    with pytest.raises(StateError, match="does not exist"):
        Conversation.load(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StateError, match="not a saved conversation: state.json, arrays.npz missing"):
        Conversation.load(model, tmp_path / "empty")
    conv.save(tmp_path / "c")
    arrays = (tmp_path / "c" / "arrays.npz").read_bytes()
    (tmp_path / "c" / "arrays.npz").write_bytes(arrays[: len(arrays) // 2])
    with pytest.raises(StateError, match="corrupted"):
        Conversation.load(model, tmp_path / "c")
    conv.save(tmp_path / "c")
    (tmp_path / "c" / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupted"):
        Conversation.load(model, tmp_path / "c")
    conv.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "state.json").read_text())
    (tmp_path / "c" / "state.json").write_text(json.dumps({**meta, "format": "something-else/9"}))
    with pytest.raises(StateError, match="not a rewire-jax conversation"):
        Conversation.load(model, tmp_path / "c")
    (tmp_path / "c" / "state.json").write_text(json.dumps({**meta, "policy": {"carry": "forget"}}))
    with pytest.raises(StateError, match="corrupted.*carry"):
        Conversation.load(model, tmp_path / "c")
