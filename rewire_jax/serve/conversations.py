"""Conversations kept by the server, per `conversation_id`: deltas, Adam state and token history.

The client sends the whole message list (OpenAI's protocol). When the stored history (its template
rendering) is a prefix of the new request's rendering, the turn continues from the stored state
(status "continued"): its context is the stored tokens + the tokens of what the new messages add,
and it starts from the stored deltas and Adam state, exactly as `Conversation.reply` would.
Otherwise (a new id, or an edited history) the state starts fresh ("new" / "reset"). After each
turn the state is written atomically to `<state_dir>/<conversation_id>` (`save_state`), so a
restarted server continues every conversation and a kill loses at most the turn in flight.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from ..conversation import template as T
from ..conversation.conversation import Conversation, Reply, _Turn
from ..conversation.policy import TurnPolicy, apply_carry
from ..conversation.state import (ConversationState, StateError, fresh_opt_state, fresh_state, model_fingerprint,
                                  read_state, save_state)
from ..rewire import RewireOptions
from .protocol import CHAT_DEFAULT_MAX, ApiError


@dataclasses.dataclass
class Turn:
    """A turn prepared for the engine (nothing stored yet)."""

    conversation_id: str
    conv: Conversation        # its state is the base the turn continues from
    turn: _Turn
    status: str               # "new" | "continued" | "reset"
    generate_args: dict       # rewire / deltas [1, L_moe, E] / opt_state for the engine
    max_tokens: int


class ConversationStore:
    """In memory (and, with `state_dir`, on disk) conversation states; one turn at a time each."""

    def __init__(self, model, template: Optional[str], state_dir: Optional[str] = None,
                 policy: TurnPolicy = TurnPolicy()):
        self.model, self.template, self.policy = model, template, policy
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = model_fingerprint(model)
        self._states: dict[str, ConversationState] = {}
        self._busy: set = set()
        self._lock = threading.Lock()

    def _stored(self, cid: str) -> Optional[ConversationState]:
        if cid in self._states:
            return self._states[cid]
        if self.state_dir is not None and (self.state_dir / cid).is_dir():
            try:
                state, _, _, _ = read_state(self.state_dir / cid, self.model, self.fingerprint)
            except StateError as e:
                raise ApiError(409, f"conversation {cid!r} cannot be continued: {e}; use a new conversation_id",
                               "conversation_id", "conversation_state_invalid") from None
            self._states[cid] = state
            return state
        return None

    def begin(self, cid: str, messages: list, opts: Optional[RewireOptions], max_tokens: int,
              limit: int) -> Turn:
        """Claim the conversation for one turn and prepare the turn's context and start state."""
        with self._lock:
            if cid in self._busy:
                raise ApiError(409, f"conversation {cid!r} has a turn in flight; send the next message after "
                                    f"its reply", "conversation_id", "conversation_busy")
            self._busy.add(cid)
        try:
            return self._prepare(cid, messages, opts, max_tokens, limit)
        except BaseException:
            self.release(cid)
            raise

    def release(self, cid: str) -> None:
        with self._lock:
            self._busy.discard(cid)

    def _prepare(self, cid, messages, opts, max_tokens, limit) -> Turn:
        model, tok = self.model, self.model.tokenizer
        stored = self._stored(cid)
        conv = Conversation(model, opts or RewireOptions(), chat_template=self.template, policy=self.policy,
                            _state=fresh_state(model.config, opts or RewireOptions()))
        conv.rewiring = opts is not None
        full = T.render(tok, self.template, messages, True)
        if stored is not None and stored.turns > 0 and full.startswith(stored.rendered):
            base, status = stored.copy(), "continued"
        else:
            status = "reset" if stored is not None else "new"
            base = conv.state
            if messages[0]["role"] == "system":   # as Conversation(system=...): the system turn first
                rendered = T.render(tok, self.template, messages[:1], False)
                if full.startswith(rendered):
                    base.messages, base.rendered, base.tokens = messages[:1], rendered, model.encode(rendered)
        conv.state = base
        context = list(base.tokens) + model.encode(full[len(base.rendered):])
        if max_tokens is None:
            max_tokens = max(1, min(CHAT_DEFAULT_MAX, limit - len(context)))
        if len(context) + max_tokens > limit:
            raise ApiError(400, f"the conversation's context ({len(context)} tokens) + max_tokens ({max_tokens}) "
                                f"exceeds this server's maximum context of {limit}; lower max_tokens or start a new "
                                f"conversation (or send a shorter message list)", "messages", "context_length_exceeded")
        if base.turns == 0:
            d, s = base.deltas, base.opt_state
        else:
            d, s = apply_carry(self.policy.carry, base.deltas, base.opt_state,
                               fresh_opt_state(conv.options, base.deltas))
        turn = _Turn(list(messages), full, context, d, s, 0)
        return Turn(cid, conv, turn, status, conv._generate_args(turn), max_tokens)

    def commit(self, t: Turn, text: str, tokens: list, phases: list, stopped: bool, deltas_out, opt_out) -> int:
        """Append the reply to the conversation, store it (atomically on disk). -> the turn number."""
        conv = t.conv
        try:
            deltas, opt_state = t.turn.deltas, t.turn.opt_state
            if conv.rewiring and conv.policy.before_reply:
                deltas, opt_state = np.asarray(deltas_out)[None], opt_out
            elif not conv.rewiring:   # a baseline turn leaves the deltas as they were
                deltas, opt_state = conv.state.deltas, conv.state.opt_state
            reply = Reply(text, list(tokens), list(t.turn.context), phases, np.array(deltas[0]), stopped)
            conv._commit(t.turn, reply, deltas, opt_state)
            if self.state_dir is not None:
                save_state(self.state_dir / t.conversation_id, conv.state, self.model, conv.options, conv.policy,
                           conv.template, self.fingerprint)
            self._states[t.conversation_id] = conv.state
            return conv.state.turns
        finally:
            self.release(t.conversation_id)
