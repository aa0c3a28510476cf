"""Conversations: each turn equals `generate` on the templated context from the carried state
(keep / reset / decay / between turns), streaming and stops, and the bad-input errors."""
import jax
import numpy as np
import pytest

import rewire_jax
from conversation_helpers import NEW, OPTS, TEMPLATE, TEMPLATE_FILE, TURNS, assert_same, demo_model
from rewire_jax import Conversation, TurnPolicy
from rewire_jax.conversation import Cancelled, TemplateError
from rewire_jax.conversation.template import render
from rewire_jax.rewire import CycleState, run_phase


@pytest.fixture(scope="module")
def model():
    return demo_model()


@pytest.mark.parametrize("carry", ["keep", "reset"])
def test_three_turns_equal_generate(model, carry):
    """Greedy, 3 turns: each reply equals generate() on the same templated context with the same
    phase schedule, started from the previous turn's deltas and Adam state (keep) or from zero (reset)."""
    conv = Conversation(model, OPTS, system="tiny helpers", chat_template=TEMPLATE, policy=TurnPolicy(carry=carry))
    for i, text in enumerate(TURNS):
        d0, s0 = conv.state.deltas, conv.state.opt_state
        r = conv.reply(text, NEW)
        # the context is the template's rendering of the conversation so far, tokenised turn by turn
        assert model.decode(r.context) == render(model.tokenizer, TEMPLATE, conv.messages[:-1], True)
        start = dict(deltas=d0, opt_state=s0) if carry == "keep" else {}
        alone = rewire_jax.generate(model, [r.context], NEW, rewire=OPTS, **start)
        assert_same(r, alone)
        assert len(r.phases) == 2    # a phase on the context, then one after `interval` tokens
        if i and carry == "keep":
            assert np.abs(d0).max() > 0
    assert [m["role"] for m in conv.messages] == ["system"] + ["user", "assistant"] * 3
    assert conv.state.turns == 3


def test_decay_scales_the_carried_state(model):
    conv = Conversation(model, OPTS, chat_template=TEMPLATE, policy=TurnPolicy(carry="decay:0.5"))
    conv.reply(TURNS[0], NEW)
    d1, s1 = conv.state.deltas, conv.state.opt_state
    r = conv.reply(TURNS[1], NEW)
    adam = s1[1]
    s_half = (s1[0], adam._replace(mu=adam.mu * 0.5, nu=adam.nu * 0.25), s1[2])
    assert_same(r, rewire_jax.generate(model, [r.context], NEW, rewire=OPTS, deltas=d1 * 0.5, opt_state=s_half))


def test_between_turns_next_reply_starts_adapted(model):
    """After a reply, a phase on the whole history; the next reply's first phase starts from those
    adapted deltas (and Adam state)."""
    conv = Conversation(model, OPTS, chat_template=TEMPLATE, policy=TurnPolicy(between_turns=True))
    r1 = conv.reply(TURNS[0], NEW)
    assert r1.between is not None and r1.between["context_len"] == len(conv.tokens)
    # the between-turn phase, recomputed: one phase on the history from the reply's final state
    plain = Conversation(model, OPTS, chat_template=TEMPLATE)
    p1 = plain.reply(TURNS[0], NEW)
    assert p1.tokens == r1.tokens and np.abs(p1.deltas - r1.deltas).max() <= 1e-6
    want, _ = run_phase(model.params, CycleState(plain.state.deltas, plain.state.opt_state, 0),
                        np.asarray([conv.tokens], np.int32), np.asarray([len(conv.tokens)], np.int32),
                        model.config, OPTS)
    assert np.abs(conv.deltas - np.asarray(want.deltas)[0]).max() <= 1e-5
    assert np.abs(conv.deltas - r1.deltas).max() > 1e-4          # it moved the deltas
    adapted, adapted_opt = conv.state.deltas, conv.state.opt_state
    r2 = conv.reply(TURNS[1], NEW)
    assert_same(r2, rewire_jax.generate(model, [r2.context], NEW, rewire=OPTS, deltas=adapted, opt_state=adapted_opt))


def test_policies_without_a_phase_before_the_reply(model):
    """between_turns only: the reply decodes with the carried deltas (no phase in the reply);
    baseline toggle: the model's own routing, and the deltas are left as they were."""
    conv = Conversation(model, OPTS, chat_template=TEMPLATE,
                        policy=TurnPolicy(before_reply=False, periodic=False, between_turns=True))
    r1 = conv.reply(TURNS[0], NEW)
    assert r1.phases == [] and np.abs(r1.deltas).max() == 0 and r1.between is not None
    adapted = conv.state.deltas
    r2 = conv.reply(TURNS[1], NEW)
    assert r2.phases == []
    assert r2.tokens == rewire_jax.generate(model, [r2.context], NEW, deltas=adapted).tokens[0]
    conv.rewiring = False
    before = np.array(conv.deltas)
    r3 = conv.reply(TURNS[2], NEW)
    assert r3.tokens == rewire_jax.generate(model, [r3.context], NEW).tokens[0]
    assert np.array_equal(conv.deltas, before)


def test_stream_equals_reply_and_cancel_changes_nothing(model):
    a = Conversation(model, OPTS, chat_template=TEMPLATE)
    b = Conversation(model, OPTS, chat_template=TEMPLATE)
    ra = a.reply(TURNS[0], NEW)
    gen = b.stream(TURNS[0], NEW, segment=2)
    pieces = list(gen)
    assert "".join(pieces) == ra.text == b.last_reply.text and len(pieces) >= 1
    assert b.last_reply.tokens == ra.tokens and np.abs(b.deltas - a.deltas).max() <= 1e-5
    snapshot = (list(b.tokens), np.array(b.deltas), b.state.turns)
    gen = b.stream(TURNS[1], 40, segment=2, eos_token_id=None)
    next(gen)
    gen.close()                   # what Ctrl-C does in the REPL
    assert (list(b.tokens), b.state.turns) == (snapshot[0], snapshot[2])
    assert np.array_equal(b.deltas, snapshot[1])


def test_stop_strings_cut_the_reply(model):
    conv = Conversation(model, OPTS, chat_template=TEMPLATE)
    free = Conversation(model, OPTS, chat_template=TEMPLATE).reply(TURNS[0], NEW, eos_token_id=None)
    stop = free.text[2:4]
    assert stop and stop in free.text
    r = conv.reply(TURNS[0], NEW, stops=[stop], eos_token_id=None)
    assert r.stopped and r.text == free.text[:free.text.index(stop)]
    assert r.tokens == free.tokens[:len(r.tokens)]


def test_template_errors(model, tmp_path):
    with pytest.raises(TemplateError, match="no chat template.*chat_template="):
        Conversation(model)
    with pytest.raises(TemplateError, match="neither a Jinja template nor an existing file"):
        Conversation(model, chat_template=str(tmp_path / "missing.jinja"))
    assert Conversation(model, chat_template=str(TEMPLATE_FILE)).template == TEMPLATE
    rewrites = "{% for m in messages %}{{ m['content'] }}{{ messages|length }}{% endfor %}"
    conv = Conversation(model, chat_template=rewrites)
    conv.reply("hi", 2)
    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        conv.reply("again", 2)
    no_tok = rewire_jax.api.Model(model.config, model.params, None, "x")
    with pytest.raises(TemplateError, match="no tokenizer"):
        Conversation(no_tok, chat_template=TEMPLATE)


def test_bad_input_changes_nothing(model):
    conv = Conversation(model, OPTS, chat_template=TEMPLATE)
    conv.reply(TURNS[0], NEW)
    snap = (list(conv.tokens), list(conv.messages), np.array(conv.deltas))
    for text in ("", "   \n"):
        with pytest.raises(ValueError, match="empty message"):
            conv.reply(text)
    with pytest.raises(ValueError, match="unknown rewiring option 'learning_rate'"):
        conv.set_options(learning_rate=0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        conv.set_options(steps=0)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 1024 positions.*overflow='trim'"):
        conv.reply(" ".join(str(i) for i in range(1500)), NEW)   # 3707 tokens
    assert (list(conv.tokens), list(conv.messages)) == snap[:2] and np.array_equal(conv.deltas, snap[2])
    for bad in (dict(carry="forget"), dict(carry="decay:2"), dict(periodic=True, before_reply=False),
                dict(between_turns=True, carry="reset"), dict(overflow="wrap")):
        with pytest.raises(ValueError):
            TurnPolicy(**bad)


def test_overflow_trim_drops_the_oldest_exchanges(model):
    """A model limited to 128 positions (the same weights): the third long message does not fit
    with the first two, so the oldest exchange is dropped and the history re-tokenised."""
    short = rewire_jax.api.Model(model.config.replace(max_position_embeddings=128), model.params, model.tokenizer,
                                 model.path)
    conv = Conversation(short, OPTS, system="keep me", chat_template=TEMPLATE, policy=TurnPolicy(overflow="trim"))
    assert conv.reply("first " * 40, 4).trimmed == 0           # 41 tokens each
    assert conv.reply("second " * 40, 4).trimmed == 0
    r = conv.reply("return " * 40, 4)
    assert r.trimmed == 2
    assert conv.messages[0] == {"role": "system", "content": "keep me"}
    assert [m["content"].split()[0] for m in conv.messages[1:] if m["role"] == "user"] == ["second", "return"]
    assert len(r.context) + 4 <= 128
    assert model.decode(r.context) == render(model.tokenizer, TEMPLATE, conv.messages[:-1], True)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 128 positions"):
        conv.reply("x " * 130, 4)        # alone too long: an error even with trim
