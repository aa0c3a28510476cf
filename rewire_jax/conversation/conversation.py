"""`Conversation`: a chat whose router deltas and Adam state carry from turn to turn.

    conv = rewire_jax.Conversation(model, rewire=RewireOptions(), chat_template=TEMPLATE)
    r = conv.reply("Explain this code: ...", max_new_tokens=128)      # r.text, r.phases, r.deltas
    for piece in conv.stream("Continue."): print(piece, end="")
    conv.save("chat-state"); conv = Conversation.load(model, "chat-state")

Each turn is one call of `rewire_jax.generate` on the templated context (the whole history + the
new message + the assistant prompt), started from the deltas and Adam state the policy carries
(`TurnPolicy`): the same cycle, phases and decode loop as a single prompt, so a turn equals
`generate(model, [context], deltas=..., opt_state=...)` token for token (tests/test_conversation.py).
A failed or cancelled turn changes nothing.
"""
from __future__ import annotations

import dataclasses
import queue as _queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from ..generation import Sampling, generate
from ..generation.queue import _find_stop, _stop_cut
from ..rewire import CycleState, RewireOptions, run_phase
from . import template as T
from .policy import TurnPolicy, apply_carry
from .state import ConversationState, fresh_opt_state, fresh_state, read_state, save_state


class Cancelled(Exception):
    """A reply stopped before it finished (Ctrl-C, a closed stream): the conversation is unchanged."""


@dataclasses.dataclass
class Reply:
    text: str                      # the reply (cut before a stop string)
    tokens: list[int]              # generated tokens (EOS included when emitted; through a stop string)
    context: list[int]             # the templated context the reply was generated from
    phases: list[dict]             # optimisation phases of this reply ({context_len, loss_before, ...})
    deltas: np.ndarray             # [L_moe, E] deltas at the end of the reply
    stopped: bool = False          # a stop string ended it
    between: Optional[dict] = None  # the between-turn phase after it (policy.between_turns)
    trimmed: int = 0               # messages dropped from the start to fit the context (overflow='trim')
    timing: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Turn:
    """A turn prepared but not yet committed."""

    messages: list[dict]
    rendered: str                  # template text of `messages` + the assistant prompt
    context: list[int]
    deltas: np.ndarray             # [1, L_moe, E] to start from
    opt_state: Any
    trimmed: int


class Conversation:
    """A chat with rewiring carried across turns. State is explicit (`.state`) and serialisable."""

    def __init__(self, model, rewire: Optional[RewireOptions] = None, system: Optional[str] = None,
                 chat_template: Optional[str] = None, policy: TurnPolicy = TurnPolicy(), *,
                 _state: Optional[ConversationState] = None):
        self.model = model
        self.options = rewire if rewire is not None else RewireOptions()
        self.policy = policy
        self.template = T.resolve_template(model, chat_template)
        self.rewiring = self.options.enabled   # False: the model's own routing (the /baseline toggle)
        self.max_len = model.config.max_position_embeddings
        if _state is not None:
            self.state = _state
        else:
            self.state = fresh_state(model.config, self.options)
            if system:
                self._set_messages([{"role": "system", "content": system}])

    # ---- text and tokens -------------------------------------------------------------------------
    def _render(self, messages, generation_prompt: bool) -> str:
        return T.render(self.model.tokenizer, self.template, messages, generation_prompt)

    def _set_messages(self, messages) -> None:
        """Replace the history by `messages`, re-tokenised from the template (reset, trim)."""
        self.state.messages = messages
        self.state.rendered = self._render(messages, False)
        self.state.tokens = self.model.encode(self.state.rendered) if self.state.rendered else []

    @property
    def messages(self) -> list[dict]:
        return self.state.messages

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens

    @property
    def deltas(self) -> np.ndarray:
        """[L_moe, E] the deltas the next turn starts from (before the carry policy)."""
        return self.state.deltas[0]

    def copy(self) -> "Conversation":
        """An independent conversation with the same model, options, policy, template and state."""
        c = Conversation(self.model, self.options, chat_template=self.template, policy=self.policy,
                         _state=self.state.copy())
        c.rewiring = self.rewiring
        return c

    def reset(self, keep_system: bool = True) -> None:
        """Forget the history, deltas and Adam state (the system message stays unless told)."""
        system = [m for m in self.state.messages[:1] if m["role"] == "system"] if keep_system else []
        self.state = fresh_state(self.model.config, self.options)
        if system:
            self._set_messages(system)

    def set_options(self, **changes) -> RewireOptions:
        """Change rewiring options (a clear error for an unknown name or a bad value)."""
        known = {f.name for f in dataclasses.fields(RewireOptions)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown rewiring option {', '.join(map(repr, unknown))}; options are: "
                             f"{', '.join(sorted(known))}")
        self.options = self.options.replace(**changes)
        self.rewiring = self.options.enabled
        return self.options

    def _prepare(self, user_text: str, max_new_tokens: int) -> _Turn:
        if not isinstance(user_text, str) or not user_text.strip():
            raise ValueError("empty message: a turn needs some text from the user")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        st = self.state
        messages, rendered, tokens, trimmed = list(st.messages), st.rendered, list(st.tokens), 0
        while True:
            msgs = messages + [{"role": "user", "content": user_text}]
            full = self._render(msgs, True)
            context = tokens + self.model.encode(T.suffix(rendered, full))
            if len(context) + max_new_tokens <= self.max_len:
                break
            first = 1 if messages[:1] and messages[0]["role"] == "system" else 0
            if self.policy.overflow == "error" or len(messages) <= first:
                raise ValueError(
                    f"the context ({len(context)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                    f"maximum of {self.max_len} positions; lower max_new_tokens, reset the conversation, shorten "
                    f"the message, or use TurnPolicy(overflow='trim') to drop the oldest exchanges")
            drop = first + 1   # the oldest exchange: a user message and the replies up to the next one
            while drop < len(messages) and messages[drop]["role"] != "user":
                drop += 1
            trimmed += drop - first
            messages = messages[:first] + messages[drop:]
            rendered = self._render(messages, False)
            tokens = self.model.encode(rendered) if rendered else []
        if st.turns == 0:
            d, s = st.deltas, st.opt_state
        else:
            d, s = apply_carry(self.policy.carry, st.deltas, st.opt_state, fresh_opt_state(self.options, st.deltas))
        return _Turn(msgs, full, context, d, s, trimmed)

    def _generate_args(self, turn: _Turn) -> dict:
        """How this turn calls `generate` under the policy."""
        if not self.rewiring:
            return dict(rewire=None, deltas=None)
        if not self.policy.before_reply:   # decode with the carried deltas, no phase
            return dict(rewire=None, deltas=turn.deltas)
        opts = self.options if self.policy.periodic else self.options.replace(continuous=False)
        return dict(rewire=opts, deltas=turn.deltas, opt_state=turn.opt_state)

    # ---- a turn ----------------------------------------------------------------------------------
    def reply(self, user_text: str, max_new_tokens: int = 128, *, sampling: Sampling = Sampling(),
              stops: Sequence[str] = (), seed: int = 0, eos_token_id: Any = "config") -> Reply:
        """Add a user message, generate the assistant's reply, commit it to the history."""
        return self._turn(user_text, max_new_tokens, sampling, tuple(stops), seed, eos_token_id)

    def stream(self, user_text: str, max_new_tokens: int = 128, *, sampling: Sampling = Sampling(),
               stops: Sequence[str] = (), seed: int = 0, eos_token_id: Any = "config",
               segment: int = 16) -> Iterator[str]:
        """`reply`, yielding text pieces as they are decoded (every `segment` tokens; with continuous
        rewiring, `segment` is lowered to divide the interval). The `Reply` is the generator's return
        value and `self.last_reply`. Closing the generator early (or Ctrl-C while iterating) stops
        the reply at the next segment and leaves the conversation unchanged."""
        if self.rewiring and self.policy.periodic and self.options.continuous:
            segment = int(np.gcd(segment, self.options.interval))
        pieces: _queue.Queue = _queue.Queue()
        cancel = threading.Event()

        def work():
            try:
                r = self._turn(user_text, max_new_tokens, sampling, tuple(stops), seed, eos_token_id,
                               on_text=lambda t: pieces.put(("text", t)), cancel=cancel, segment=segment)
                pieces.put(("done", r))
            except BaseException as e:   # handed to the consumer's thread
                pieces.put(("error", e))

        worker = threading.Thread(target=work, name="rewire-jax-reply", daemon=True)
        worker.start()
        try:
            while True:
                kind, x = pieces.get()
                if kind == "text":
                    yield x
                elif kind == "error":
                    raise x
                else:
                    self.last_reply = x
                    return x
        finally:
            cancel.set()
            worker.join()

    def _turn(self, user_text, max_new_tokens, sampling, stops, seed, eos_token_id,
              on_text: Optional[Callable[[str], None]] = None, cancel: Optional[threading.Event] = None,
              segment: Optional[int] = None) -> Reply:
        turn = self._prepare(user_text, max_new_tokens)
        tok = self.model.tokenizer
        shown = [0]

        def on_segment(_, new):
            if cancel is not None and cancel.is_set():
                return True
            text = tok.decode(new[0], skip_special_tokens=True)
            at = _find_stop(text, stops) if stops else -1
            if on_text is not None:
                visible = text[:at] if at >= 0 else text
                if len(visible) > shown[0]:
                    on_text(visible[shown[0]:])
                    shown[0] = len(visible)
            return at >= 0

        res = generate(self.model, [turn.context], max_new_tokens, sampling=sampling, seed=seed,
                       eos_token_id=eos_token_id, segment=segment,
                       on_segment=on_segment if (stops or on_text or cancel) else None, **self._generate_args(turn))
        if cancel is not None and cancel.is_set():
            raise Cancelled("the reply was stopped; the conversation is unchanged")
        new, stopped = res.tokens[0], False
        if stops:
            cut = _stop_cut(tok, turn.context, new, stops, 0)
            if cut is not None:
                new, stopped = new[:cut], True
        text = tok.decode(new, skip_special_tokens=True)
        if stopped:
            text = text[:_find_stop(text, stops)]
        elif on_text is not None and len(text) > shown[0]:
            on_text(text[shown[0]:])
        deltas, opt_state = turn.deltas, turn.opt_state
        if self.rewiring and self.policy.before_reply:
            deltas, opt_state = res.deltas[:1], res.opt_state
        elif not self.rewiring:   # a baseline turn leaves the deltas as they were
            deltas, opt_state = self.state.deltas, self.state.opt_state
        reply = Reply(text, list(new), list(turn.context), res.phase_dicts(), np.array(deltas[0]), stopped,
                      trimmed=turn.trimmed, timing=dict(res.timing))
        self._commit(turn, reply, deltas, opt_state)
        return reply

    def _commit(self, turn: _Turn, reply: Reply, deltas, opt_state) -> None:
        """Append the reply to the history (and run the between-turn phase)."""
        eos = set(self.model.config.eos_token_ids)
        messages = turn.messages + [{"role": "assistant", "content": reply.text}]
        rendered = self._render(messages, False)
        body = turn.rendered + reply.text
        gen = reply.tokens[:-1] if (reply.tokens and reply.tokens[-1] in eos) else reply.tokens
        if rendered.startswith(body) and not reply.stopped:
            tokens = turn.context + gen + self.model.encode(rendered[len(body):])
        elif rendered.startswith(body):   # the stop string stays in what the model has seen
            tokens = turn.context + list(reply.tokens) + self.model.encode(rendered[len(body):])
        else:   # the template rewrites the reply (e.g. strips it): the history re-tokenised
            tokens = self.model.encode(rendered)
        if self.rewiring and self.policy.between_turns:
            state, out = run_phase(self.model.params, CycleState(np.array(deltas), opt_state, self.state.turns),
                                   np.asarray([tokens], np.int32), np.asarray([len(tokens)], np.int32),
                                   self.model.config, self.options)
            reply.between = {"context_len": len(tokens), "loss_before": float(np.asarray(out.loss)[0]),
                             "scores": np.asarray(out.scores)[0].tolist(),
                             "weights": np.asarray(out.weights)[0].tolist()}
            deltas, opt_state = np.asarray(state.deltas), state.opt_state
        self.state = ConversationState(messages, tokens, rendered, np.asarray(deltas, np.float32),
                                       jax.tree.map(np.asarray, opt_state), self.state.turns + 1)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, out_dir) -> None:
        """Write the state to `out_dir` atomically (replacing an earlier save)."""
        save_state(out_dir, self.state, self.model, self.options, self.policy, self.template)

    @classmethod
    def load(cls, model, src) -> "Conversation":
        """A conversation saved with `save`; a clear error if `src` is corrupted or from another model."""
        state, opts, policy, template = read_state(src, model)
        return cls(model, opts, chat_template=template, policy=policy, _state=state)
