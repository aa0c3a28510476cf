"""`rewire-jax chat`: a terminal REPL over a `Conversation` (standard library: `input` with readline
history and line editing where the platform has it).

Commands: /save [DIR], /load [DIR], /reset, /deltas, /options [name=value ...], /baseline, /quit
(or Ctrl-D), /help. Replies stream as they are decoded; Ctrl-C stops the current reply and leaves
the conversation as it was before that message.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .conversation import Cancelled, Conversation
from .policy import TurnPolicy
from .state import StateError

HELP = """commands:
  /save [DIR]            save the conversation (default: --state DIR)
  /load [DIR]            load a saved conversation (default: --state DIR)
  /reset                 forget the history, deltas and Adam state
  /deltas                per-layer delta norms and the experts pushed most up / down
  /options [k=v ...]     show the rewiring options, or set some (e.g. /options lr=0.01 steps=3)
  /baseline              toggle rewiring (off: the model's own routing; the deltas are kept)
  /quit                  leave (also Ctrl-D); Ctrl-C stops a reply"""

DEMO_TEMPLATE = Path(__file__).parent.parent / "demo" / "chat_template.jinja"


def add_parser(sub) -> None:
    from ..rewire import RewireOptions
    d = RewireOptions()
    c = sub.add_parser("chat", help="chat in the terminal, rewiring carried across turns")
    c.add_argument("--model", default=None, help="model directory or hub id (default: the bundled demo model, "
                                                 "with its chat template rewire_jax/demo/chat_template.jinja)")
    c.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template file (needed when the model has none)")
    c.add_argument("--state", metavar="DIR", default=None,
                   help="conversation directory: loaded at start if it exists; /save and /load default to it")
    c.add_argument("--system", default=None, help="system message for a new conversation")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--steps", type=int, default=d.steps, help="Adam steps per phase (n)")
    c.add_argument("--interval", type=int, default=d.interval, help="tokens between phases (m)")
    c.add_argument("--lr", type=float, default=d.lr)
    c.add_argument("--carry", default="keep", help="keep | reset | decay:x (deltas into the next turn)")
    c.add_argument("--between-turns", action="store_true", help="optimise on the history after each reply")
    c.add_argument("--baseline", action="store_true", help="start with rewiring off")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def deltas_table(conv: Conversation, top: int = 2) -> str:
    """Per MoE layer: the delta norm and the experts pushed most up and down."""
    d = np.asarray(conv.deltas)
    rows = [f"{'layer':>5} {'norm':>8}  {'pushed up':<24} {'pushed down':<24}"]
    for i, layer in enumerate(conv.model.config.moe_layers):
        order = np.argsort(d[i])
        up = ", ".join(f"e{e}:{d[i, e]:+.3f}" for e in order[::-1][:top])
        down = ", ".join(f"e{e}:{d[i, e]:+.3f}" for e in order[:top])
        rows.append(f"{layer:>5} {np.linalg.norm(d[i]):>8.4f}  {up:<24} {down:<24}")
    return "\n".join(rows)


def parse_options(conv: Conversation, args: list[str]) -> dict:
    """['lr=0.01', 'steps=3'] -> typed changes (a clear error for a bad or unknown one)."""
    fields = {f.name: f for f in dataclasses.fields(conv.options)}
    out = {}
    for a in args:
        if "=" not in a:
            raise ValueError(f"{a!r}: write options as name=value (e.g. lr=0.01)")
        k, v = a.split("=", 1)
        if k not in fields:
            raise ValueError(f"unknown rewiring option {k!r}; options are: {', '.join(sorted(fields))}")
        cur = getattr(conv.options, k)
        try:
            if isinstance(cur, bool):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[k] = v.lower() in ("true", "1", "yes")
            else:
                out[k] = type(cur)(v)
        except ValueError:
            raise ValueError(f"option {k}: {v!r} is not a valid {type(cur).__name__}") from None
    return out


class Repl:
    def __init__(self, conv: Conversation, state_dir: Optional[str], max_new_tokens: int, sampling, seed: int,
                 out=sys.stdout):
        self.conv, self.state_dir, self.max_new, self.sampling, self.seed, self.out = \
            conv, state_dir, max_new_tokens, sampling, seed, out

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        name, *args = line.split()
        c = self.conv
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name in ("/save", "/load"):
            where = args[0] if args else self.state_dir
            if where is None:
                self.say(f"error: {name} needs a directory (or start with --state DIR)")
            elif name == "/save":
                c.save(where)
                self.say(f"saved {c.state.turns} turns to {where}")
            else:
                loaded = Conversation.load(c.model, where)
                loaded.rewiring = c.rewiring and loaded.options.enabled
                self.conv = loaded
                self.say(f"loaded {loaded.state.turns} turns from {where}")
        elif name == "/reset":
            c.reset()
            self.say("conversation reset (history, deltas and Adam state)")
        elif name == "/deltas":
            self.say(deltas_table(c))
        elif name == "/options":
            if args:
                c.set_options(**parse_options(c, args))
            self.say(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(c.options).items()))
            self.say(f"policy: {dataclasses.asdict(c.policy)}")
        elif name == "/baseline":
            c.rewiring = not c.rewiring and c.options.enabled
            self.say(f"rewiring {'on' if c.rewiring else 'off (baseline: the model own routing)'}")
        else:
            self.say(f"error: unknown command {name}; /help lists them")
        return True

    def turn(self, text: str) -> None:
        gen = self.conv.stream(text, self.max_new, sampling=self.sampling, seed=self.seed)
        try:
            for piece in gen:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            gen.close()
            self.say("\n[stopped: the conversation is as it was before this message]")
            return
        except Cancelled:
            self.say("\n[stopped]")
            return
        r = self.conv.last_reply
        losses = ", ".join(f"{p['loss_before']:.3f}->{p['loss_after']:.3f}" for p in r.phases)
        self.say(f"\n[{len(r.tokens)} tokens; {len(r.phases)} phases{': ' + losses if losses else ''}"
                 f"{'; trimmed ' + str(r.trimmed) + ' messages' if r.trimmed else ''}]")

    def loop(self, read=input) -> int:
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("")
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                else:
                    self.turn(line)
            except (ValueError, FileNotFoundError, FileExistsError) as e:
                self.say(f"error: {e}")


def main(a) -> int:
    from ..api import load
    from ..demo import DEMO_MODEL
    from ..generation import Sampling
    from ..rewire import RewireOptions

    try:
        import readline  # noqa: F401  (history and line editing for input())
    except ImportError:
        pass
    template = a.chat_template
    if a.model is None and template is None:
        template = str(DEMO_TEMPLATE)
    model = load(a.model or DEMO_MODEL, dtype=a.dtype)
    opts = RewireOptions(steps=a.steps, interval=a.interval, lr=a.lr, seed=a.seed)
    policy = TurnPolicy(carry=a.carry, between_turns=a.between_turns)
    if a.state and Path(a.state).exists():
        conv = Conversation.load(model, a.state)
        print(f"loaded {conv.state.turns} turns from {a.state}")
    else:
        conv = Conversation(model, opts, system=a.system, chat_template=template, policy=policy)
    conv.rewiring = conv.options.enabled and not a.baseline
    print(f"rewire-jax chat: {model.path} ({'rewiring on' if conv.rewiring else 'baseline'}); /help for commands")
    repl = Repl(conv, a.state, a.max_new_tokens, Sampling(a.temperature), a.seed)
    try:
        return repl.loop()
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
