"""Experiment: does optimising the router deltas *between turns* lower the next turn's NLL?

Dialogues are built from held-out stdlib code (the demo model's held-out split, never trained on)
with the demo chat template: the user asks to continue a code excerpt (the first P tokens of a
module), the assistant's first reply is the module's next C tokens, the user says "continue", and
the second reply is the C tokens after that. Replies are teacher-forced; the templated pieces are
the template's own text, so every dialogue has the same layout and all of them run as one batch.

Each turn runs the paper's cycle teacher-forced (as `heldout_nll.evaluate`): a phase on the
context, score the next m reply tokens, a phase on the context so far, ... Deltas and Adam state
are kept from turn 1 to turn 2 (the conversation's default). Compared on the second reply:
  baseline          deltas 0, no optimisation
  reset             turn 2's cycle from zero deltas and a fresh Adam (every turn alone)
  keep              turn 2's cycle from turn 1's final state (the Conversation default)
  keep + between    as keep, plus one phase on the whole history right after turn 1
                    (TurnPolicy(between_turns=True))
Prints mean turn-2 NLL (nats/token) and paired differences with standard errors over dialogues.

    python -m rewire_jax.experiments.between_turns [--model DIR --chat-template FILE] [--prefix 128 --cont 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..api import Model, load
from ..demo import DEMO_MODEL
from ..conversation.template import render, resolve_template
from ..rewire import CycleState, RewireOptions, run_phase, start_cycle
from .heldout_nll import _mean_se, span_nll

DEMO_TEMPLATE = Path(__file__).parent.parent / "demo" / "chat_template.jinja"
_A, _B, _C = "\x00A\x00", "\x00B\x00", "\x00C\x00"   # placeholders for the code pieces


def layout(model: Model, template: str, ask: str = "Continue this code:") -> list[list[int]]:
    """The template's own token pieces around the three code pieces: [before excerpt, excerpt ->
    reply 1, reply 1 -> reply 2, the closing of reply 1 alone (what a conversation's history holds
    after reply 1)]."""
    msgs = [{"role": "user", "content": f"{ask}\n{_A}"}, {"role": "assistant", "content": _B},
            {"role": "user", "content": "continue"}, {"role": "assistant", "content": _C}]
    text = render(model.tokenizer, template, msgs, False)
    head, rest = text.split(_A)
    mid1, rest = rest.split(_B)
    mid2, _ = rest.split(_C)
    closing = render(model.tokenizer, template, msgs[:2], False).split(_B)[1]   # after reply 1, before "continue"
    return [model.encode(head), model.encode(mid1), model.encode(mid2), model.encode(closing)]


def dialogues(model: Model, template: str, prefix: int, cont: int, max_docs: int):
    """-> (tokens [N, T], spans {reply1: (a, b), reply2: (a, b), history1: length of the history
    after reply 1}): held-out code as dialogues."""
    from ..demo import corpus, data

    n = prefix + 2 * cont
    docs = np.stack(data.documents(model.tokenizer, corpus.heldout_files(), n, n)[:max_docs])
    head, mid1, mid2, closing = layout(model, template)
    if mid2[:len(closing)] != closing:
        raise ValueError("the chat template's closing of a reply is not a prefix of the next turn's text")
    pieces = [np.broadcast_to(np.asarray(p, np.int32), (len(docs), len(p))) for p in (head, mid1, mid2)]
    tokens = np.concatenate([pieces[0], docs[:, :prefix], pieces[1], docs[:, prefix:prefix + cont], pieces[2],
                             docs[:, prefix + cont:]], 1)
    a1 = len(head) + prefix + len(mid1)
    a2 = a1 + cont + len(mid2)
    return tokens, {"reply1": (a1, a1 + cont), "reply2": (a2, a2 + cont), "history1": a1 + cont + len(closing)}


def cycle(model: Model, tokens: np.ndarray, state: CycleState, span, opts: RewireOptions):
    """The cycle over one reply, teacher-forced: phase on tokens[:, :s], score [s, s+m), ...
    -> (mean NLL per dialogue [N], state after the reply)."""
    cfg, params = model.config, model.params
    N = len(tokens)
    start, end = span
    total = np.zeros(N)
    while start < end:
        state, _ = run_phase(params, state, tokens[:, :start], np.full(N, start), cfg, opts)
        stop = min(start + opts.interval, end)
        total += np.asarray(span_nll(params, tokens, state.deltas, start, stop, cfg)) * (stop - start)
        start = stop
    return total / (span[1] - span[0]), state


def copy_state(s: CycleState) -> CycleState:
    import jax
    return CycleState(np.array(s.deltas), jax.tree.map(np.array, s.opt_state), s.phase_index)


def evaluate(model: Model, tokens: np.ndarray, spans: dict, opts: RewireOptions) -> dict[str, np.ndarray]:
    cfg, params = model.config, model.params
    N = len(tokens)
    a2, b2 = spans["reply2"]
    out = {"baseline": np.asarray(span_nll(params, tokens, np.zeros((N, *cfg.delta_shape), np.float32), a2, b2, cfg))}
    out["reset"], _ = cycle(model, tokens, start_cycle(cfg, opts, N), spans["reply2"], opts)
    _, after1 = cycle(model, tokens, start_cycle(cfg, opts, N), spans["reply1"], opts)
    out["keep"], _ = cycle(model, tokens, copy_state(after1), spans["reply2"], opts)
    # between turns: right after reply 1 (its closing included), before the user's next message
    end1 = spans["history1"]
    between, _ = run_phase(params, copy_state(after1), tokens[:, :end1], np.full(N, end1), cfg, opts)
    out["keep + between"], _ = cycle(model, tokens, between, spans["reply2"], opts)
    return out


def table(res: dict[str, np.ndarray]) -> str:
    lines = ["| turn 2 from | NLL (nats/token) | Δ vs keep | Δ vs baseline |", "|---|---|---|---|"]
    for name, v in res.items():
        m, se = _mean_se(v)
        dk, dks = _mean_se(v - res["keep"])
        db, dbs = _mean_se(v - res["baseline"])
        lines.append(f"| {name} | {m:.4f} ± {se:.4f} | {'—' if name == 'keep' else f'{dk:+.4f} ± {dks:.4f}'} | "
                     f"{'—' if name == 'baseline' else f'{db:+.4f} ± {dbs:.4f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewire_jax.experiments.between_turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--chat-template", default=None, help="Jinja file (default: the demo model's template)")
    p.add_argument("--prefix", type=int, default=128, help="code tokens in the user's first message")
    p.add_argument("--cont", type=int, default=64, help="tokens per assistant reply (teacher-forced)")
    p.add_argument("--interval", type=int, default=32, help="m: tokens between phases inside a reply")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-docs", type=int, default=48)
    p.add_argument("--json", help="write per-dialogue NLLs here")
    a = p.parse_args(argv)
    model = load(a.model)
    template = a.chat_template or (str(DEMO_TEMPLATE) if a.model == str(DEMO_MODEL) else None)
    template = resolve_template(model, template)
    tokens, spans = dialogues(model, template, a.prefix, a.cont, a.max_docs)
    opts = RewireOptions(steps=a.steps, lr=a.lr, interval=a.interval)
    print(f"model {a.model}; {len(tokens)} held-out dialogues of {tokens.shape[1]} tokens; excerpt {a.prefix}, "
          f"replies {a.cont}, m {a.interval}, n {a.steps}, lr {a.lr}")
    t0 = time.perf_counter()
    res = evaluate(model, tokens, spans, opts)
    print(table(res))
    print(f"({time.perf_counter() - t0:.1f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v.tolist() for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
