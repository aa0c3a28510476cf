"""Conversations: rewiring carried across turns, saved and restored, many advanced at once.

  policy.py        TurnPolicy (when to optimise, what to carry: keep | reset | decay:x, overflow)
  template.py      chat templates: resolve (never guessed), render, the text a turn adds
  state.py         ConversationState (plain data), model fingerprint, atomic save / checked load
  conversation.py  Conversation: reply / stream / save / load, one `generate` call per turn
  many.py          reply_many: one turn of several conversations on the generation queue
  repl.py          the `rewire-jax chat` terminal REPL
"""
from .conversation import Cancelled, Conversation, Reply
from .many import reply_many
from .policy import TurnPolicy
from .state import ConversationState, StateError, model_fingerprint
from .template import TemplateError

__all__ = ["Cancelled", "Conversation", "ConversationState", "Reply", "StateError", "TemplateError", "TurnPolicy",
           "model_fingerprint", "reply_many"]
