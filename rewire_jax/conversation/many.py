"""`reply_many`: advance several conversations by one turn in one batch on the generation queue.

    replies = rewire_jax.reply_many([conv_a, conv_b, ...], ["Explain ...", "Continue."], max_new_tokens=128)

Every conversation runs its own cycle from its own deltas and Adam state (`generate_queue` with
per-prompt deltas / opt_state): greedy tokens and deltas equal what `conv.reply(text)` gives each
alone (tests/test_conversation_many.py). A server loop calls it with the conversations that have a
pending message. Conversations must share the model, the rewiring options and the policy.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..generation import Sampling, generate_queue
from ..generation.queue import _find_stop
from .conversation import Conversation, Reply
from .state import as_batch_opt


def reply_many(conversations: Sequence[Conversation], user_texts: Sequence[str], max_new_tokens=128, *,
               sampling: Sampling = Sampling(), stops=None, batch_size: Optional[int] = None, seed: int = 0,
               eos_token_id: Any = "config") -> list[Reply]:
    """One turn of each conversation (`user_texts[i]` to `conversations[i]`), batched.

    max_new_tokens: an int or one per conversation; stops: None, one list for all, or one list per
    conversation; batch_size: queue rows (default: all the conversations). Nothing is committed
    unless every turn succeeds. Sampling (temperature > 0) draws from one key stream for the batch.
    """
    convs = list(conversations)
    if len(convs) != len(user_texts):
        raise ValueError(f"{len(convs)} conversations but {len(user_texts)} messages: give one message each")
    if not convs:
        raise ValueError("no conversations given")
    if len({id(c) for c in convs}) != len(convs):
        raise ValueError("a conversation appears twice; one turn per conversation per call")
    first = convs[0]
    for c in convs[1:]:
        if c.model is not first.model:
            raise ValueError("reply_many needs conversations on one model (the same Model object)")
        if (c.options, c.policy, c.rewiring) != (first.options, first.policy, first.rewiring):
            raise ValueError("reply_many needs conversations with the same rewiring options, policy and "
                             "rewiring on/off; group them by those and call once per group")
    n = len(convs)
    budgets = [int(max_new_tokens)] * n if np.ndim(max_new_tokens) == 0 else [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens: {len(budgets)} values for {n} conversations")
    if stops is None or (len(stops) > 0 and isinstance(stops[0], str)) or len(stops) == 0:
        stops = [tuple(stops or ())] * n
    turns = [c._prepare(t, b) for c, t, b in zip(convs, user_texts, budgets)]
    args = [c._generate_args(t) for c, t in zip(convs, turns)]
    kw = dict(rewire=args[0]["rewire"])
    if args[0]["deltas"] is not None:
        kw["deltas"] = np.concatenate([a["deltas"] for a in args], 0)
    if "opt_state" in args[0]:
        kw["opt_state"] = as_batch_opt([a["opt_state"] for a in args])
    q = generate_queue(first.model, [t.context for t in turns], budgets, batch_size=batch_size or n,
                       sampling=sampling, seed=seed, eos_token_id=eos_token_id, stops=[list(s) for s in stops], **kw)
    replies, carried = [], []
    for i, (c, t) in enumerate(zip(convs, turns)):
        new = list(q.tokens[i])
        deltas, opt_state = t.deltas, t.opt_state
        if c.rewiring and c.policy.before_reply:
            deltas, opt_state = q.deltas[i][None], q.opt_states[i]
        elif not c.rewiring:   # a baseline turn leaves the deltas as they were
            deltas, opt_state = c.state.deltas, c.state.opt_state
        text = c.model.tokenizer.decode(new, skip_special_tokens=True)
        if q.stopped[i]:
            text = text[:_find_stop(text, stops[i])]
        replies.append(Reply(text, new, list(t.context), q.phases[i], np.array(deltas[0]), bool(q.stopped[i]),
                             trimmed=t.trimmed, timing=dict(q.timing)))
        carried.append((deltas, opt_state))
    for c, t, r, (deltas, opt_state) in zip(convs, turns, replies, carried):
        c._commit(t, r, deltas, opt_state)
    return replies
