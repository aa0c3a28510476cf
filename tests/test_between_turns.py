"""The between-turns NLL experiment's machinery on the demo model (tiny budgets; the real run is
`python -m rewire_jax.experiments.between_turns`, reported in docs/conversations.md)."""
import numpy as np

from conversation_helpers import TEMPLATE, demo_model
from rewire_jax.conversation.template import render
from rewire_jax.experiments import between_turns as E


def test_dialogues_follow_the_template_and_evaluate_runs():
    model = demo_model()
    tokens, spans = E.dialogues(model, TEMPLATE, prefix=16, cont=8, max_docs=2)
    a1, b1 = spans["reply1"]
    a2, b2 = spans["reply2"]
    assert tokens.shape == (2, b2) and b1 - a1 == b2 - a2 == 8
    head, mid1, mid2, closing = E.layout(model, TEMPLATE)
    for row in tokens:   # the layout is the template's own rendering, piece by piece
        user1 = model.decode(row[len(head):a1 - len(mid1)])
        reply1 = model.decode(row[a1:b1])
        msgs = [{"role": "user", "content": "Continue this code:\n" + user1}, {"role": "assistant", "content": reply1}]
        assert model.decode(row[:a1]) == render(model.tokenizer, TEMPLATE, msgs[:1], True)
        assert model.decode(row[:spans["history1"]]) == render(model.tokenizer, TEMPLATE, msgs, False)
        msgs.append({"role": "user", "content": "continue"})
        assert model.decode(row[:a2]) == render(model.tokenizer, TEMPLATE, msgs, True)
    res = E.evaluate(model, tokens, spans, E.RewireOptions(interval=8, steps=2))
    assert set(res) == {"baseline", "reset", "keep", "keep + between"}
    assert all(v.shape == (2,) and np.all(np.isfinite(v)) for v in res.values())
    assert not np.allclose(res["keep"], res["keep + between"])
    assert "| keep + between |" in E.table(res)
