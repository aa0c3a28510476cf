"""`reply_many`: one turn of several conversations in one queue batch equals each advanced alone."""
import numpy as np
import pytest

from conversation_helpers import NEW, OPTS, TEMPLATE, demo_model
from rewire_jax import Conversation, TurnPolicy, reply_many
from rewire_jax.conversation.state import ConversationState

OPENERS = ["def add(a, b):", "class Stack:", "import os", "for i in range(3):"]


@pytest.fixture(scope="module")
def convs():
    """4 conversations whose contexts differ in length: different system messages and openers, one
    with an earlier turn (so also different deltas and Adam states to start from)."""
    model = demo_model()
    systems = [None, "tiny helpers", "you write short, well tested Python functions", None]
    out = []
    for i, (opener, system) in enumerate(zip(OPENERS, systems)):
        c = Conversation(model, OPTS, system=system, chat_template=TEMPLATE)
        if i == 3:
            c.reply(f"{opener} # part 0", 5)
        out.append(c)
    return out


def test_reply_many_equals_each_alone(convs):
    texts = ["continue", "more please", "next", "go on"]
    budgets = [NEW, 3, NEW + 2, 5]
    alone = [c.copy().reply(t, b) for c, t, b in zip(convs, texts, budgets)]
    assert len({len(a.context) for a in alone}) == 4
    many = reply_many(convs, texts, budgets, batch_size=2)
    for a, m, c in zip(alone, many, convs):
        assert m.tokens == a.tokens and m.text == a.text and m.context == a.context
        assert np.abs(m.deltas - a.deltas).max() <= 1e-5
        assert [p["context_len"] for p in m.phases] == [p["context_len"] for p in a.phases]
        assert c.messages[-1] == {"role": "assistant", "content": a.text}
        assert np.abs(c.deltas - a.deltas).max() <= 1e-5


def test_reply_many_errors_commit_nothing(convs):
    before = [list(c.tokens) for c in convs]
    with pytest.raises(ValueError, match="one message each"):
        reply_many(convs, ["a"])
    with pytest.raises(ValueError, match="empty message"):
        reply_many(convs[:2], ["fine", " "])
    odd = Conversation(convs[0].model, OPTS, chat_template=TEMPLATE, policy=TurnPolicy(carry="reset"))
    with pytest.raises(ValueError, match="same rewiring options, policy"):
        reply_many([convs[0], odd], ["a", "b"])
    with pytest.raises(ValueError, match="appears twice"):
        reply_many([convs[0], convs[0]], ["a", "b"])
    assert [list(c.tokens) for c in convs] == before
    assert isinstance(convs[0].state, ConversationState)
