"""A short transcript of a conversation on the demo model showing the deltas carried over: for
each turn, the deltas' norm it starts from, its phases, the norm it ends with.

    python -m rewire_jax.conversation.transcript [--carry keep|reset|decay:x] [--between-turns]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

TURNS = ["def fibonacci(n):", "continue", "now write a test for it"]


def main(argv=None) -> int:
    from ..api import load
    from ..demo import DEMO_MODEL
    from ..rewire import RewireOptions
    from .conversation import Conversation
    from .policy import TurnPolicy
    from .repl import DEMO_TEMPLATE

    p = argparse.ArgumentParser(prog="python -m rewire_jax.conversation.transcript", description=__doc__)
    p.add_argument("--carry", default="keep")
    p.add_argument("--between-turns", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--interval", type=int, default=16)
    a = p.parse_args(argv)
    model = load(DEMO_MODEL)
    conv = Conversation(model, RewireOptions(interval=a.interval), system="Python helpers",
                        chat_template=str(DEMO_TEMPLATE),
                        policy=TurnPolicy(carry=a.carry, between_turns=a.between_turns))
    print(f"policy: carry={a.carry} between_turns={a.between_turns}; interval {a.interval}, greedy")
    for text in TURNS:
        start = float(np.linalg.norm(conv.deltas))
        r = conv.reply(text, a.max_new_tokens)
        print(f"\n>>> {text}\n{r.text.rstrip()}")
        phases = "; ".join(f"@{p['context_len']}: {p['loss_before']:.3f}->{p['loss_after']:.3f}" for p in r.phases)
        print(f"[context {len(r.context)} tokens; deltas |d| {start:.4f} at the start -> "
              f"{float(np.linalg.norm(r.deltas)):.4f} after the reply; phases {phases}]")
        if r.between:
            print(f"[between turns @{r.between['context_len']}: loss {r.between['loss_before']:.3f}; "
                  f"|d| now {float(np.linalg.norm(conv.deltas)):.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
