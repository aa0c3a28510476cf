"""When a conversation optimises its router deltas and what it carries from one turn to the next."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

OVERFLOWS = ("error", "trim")


@dataclasses.dataclass(frozen=True)
class TurnPolicy:
    """A conversation's rewiring schedule (defaults: the paper's cycle on every turn, deltas kept).

    before_reply: a phase on the new context (the whole history + the new message) before the
      reply's first token.
    periodic: a phase every `RewireOptions.interval` reply tokens (as `generate` does); needs
      before_reply (the cycle's phases are counted from the context).
    between_turns: right after a reply, a phase on the whole history (reply included), so that
      the next reply starts adapted (in a REPL or server this runs while the user types).
    carry: what the next turn starts from: "keep" (deltas and Adam state as they are), "reset"
      (zeros and a fresh Adam state, as `generate` on each context), or "decay:x" with 0 <= x <= 1
      (deltas and Adam's first moment scaled by x, its second moment by x**2; step counts kept).
    overflow: a context + max_new_tokens longer than the model's max_position_embeddings is an
      "error" (nothing changes) or is "trim"med: the oldest user/assistant exchanges are dropped
      (the system message stays) and the history is re-tokenised from the template.
    """

    before_reply: bool = True
    periodic: bool = True
    between_turns: bool = False
    carry: str = "keep"
    overflow: str = "error"

    def __post_init__(self):
        decay_factor(self.carry)   # validates
        if self.periodic and not self.before_reply:
            raise ValueError("periodic=True needs before_reply=True: the cycle's phases are counted from a phase "
                             "on the context; use before_reply=True, or periodic=False")
        if self.between_turns and self.carry == "reset":
            raise ValueError("between_turns=True with carry='reset' would throw the adapted deltas away before "
                             "the next reply; use carry='keep' or 'decay:x'")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow={self.overflow!r} is not valid; choose one of {', '.join(OVERFLOWS)}")

    @property
    def optimises(self) -> bool:
        return self.before_reply or self.between_turns

    def replace(self, **kw) -> "TurnPolicy":
        return dataclasses.replace(self, **kw)


def decay_factor(carry: str) -> Optional[float]:
    """'keep' -> 1.0, 'reset' -> None, 'decay:x' -> x; anything else is a clear error."""
    if carry == "keep":
        return 1.0
    if carry == "reset":
        return None
    if isinstance(carry, str) and carry.startswith("decay:"):
        try:
            x = float(carry[len("decay:"):])
        except ValueError:
            x = float("nan")
        if 0.0 <= x <= 1.0:
            return x
    raise ValueError(f"carry={carry!r} is not valid; use 'keep', 'reset' or 'decay:x' with 0 <= x <= 1 (e.g. 'decay:0.5')")


def apply_carry(carry: str, deltas: np.ndarray, opt_state, fresh_opt_state):
    """deltas [1, L_moe, E] and their Adam state -> what the next turn starts from."""
    x = decay_factor(carry)
    if x is None:
        return np.zeros_like(deltas), fresh_opt_state
    if x == 1.0:
        return deltas, opt_state
    # optax's ScaleByAdamState: (count [1, L], mu, nu [1, L, E]); EmptyState nodes have no leaves
    def scale(node):
        if hasattr(node, "mu") and hasattr(node, "nu"):
            return node._replace(mu=np.asarray(node.mu) * x, nu=np.asarray(node.nu) * x * x)
        return node
    opt = tuple(scale(s) for s in opt_state) if isinstance(opt_state, tuple) else opt_state
    return (deltas * x).astype(np.float32), jax.tree.map(np.asarray, opt)
