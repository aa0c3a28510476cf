"""A conversation's state as plain data, its model fingerprint, and its atomic save / load.

On disk (one directory, written with `io.atomic.atomic_directory`: a kill at any moment leaves the
previous directory or the new one, never a mix):
  state.json    format, fingerprint, messages, token history, options, policy, template, turns
  arrays.npz    deltas [1, L_moe, E] and the Adam state's leaves (opt_0, opt_1, ...)
The KV cache is not stored: loading rebuilds it with one prefill of the history.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..io.atomic import atomic_directory
from ..rewire import RewireOptions
from ..rewire.selection import init_opt_state
from .policy import TurnPolicy

FORMAT = "rewire-jax-conversation/1"
FILES = ("state.json", "arrays.npz")


class StateError(ValueError):
    """A state directory that is missing, corrupted, or from another model."""


@dataclasses.dataclass
class ConversationState:
    """Everything a conversation carries between turns (host data; serialisable)."""

    messages: list[dict]          # [{"role", "content"}], system message first if any
    tokens: list[int]             # the token history (what the model has seen, replies included)
    rendered: str                 # the template's text for `messages` (what `tokens` encode)
    deltas: np.ndarray            # [1, L_moe, E] fp32
    opt_state: Any                # Adam state, [1, ...] leaves (init_opt_state's layout)
    turns: int = 0

    def copy(self) -> "ConversationState":
        return ConversationState([dict(m) for m in self.messages], list(self.tokens), self.rendered,
                                 np.array(self.deltas), jax.tree.map(np.array, self.opt_state), self.turns)


def fresh_state(cfg, opts: RewireOptions) -> ConversationState:
    d = np.zeros((1, *cfg.delta_shape), np.float32)
    return ConversationState([], [], "", d, fresh_opt_state(opts, d))


def fresh_opt_state(opts: RewireOptions, deltas: np.ndarray):
    return jax.tree.map(np.asarray, init_opt_state(opts, deltas))


def model_fingerprint(model) -> dict:
    """Config (its fields, minus how it runs: dispatch, mesh, remat) + a hash of every weight's path,
    shape, dtype and a strided sample of its values."""
    skip = ("dispatch", "mesh", "remat", "dtype")   # how it runs, not which model it is
    cfg = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in skip}
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|".encode())
        # a strided sample, taken on the device (a large model's weights never come to the host), at
        # bfloat16 precision (the same weights loaded as float32 or bfloat16 agree)
        flat = jnp.ravel(leaf)
        sample = flat[:: max(1, flat.size // 64)][:64].astype(jnp.bfloat16).astype(jnp.float32)
        h.update(np.asarray(sample).tobytes())
    return {"config": json.loads(json.dumps(cfg, default=str)), "weights": h.hexdigest(),
            "path": str(model.path) if model.path else None}


def save_state(out_dir, state: ConversationState, model, opts: RewireOptions, policy: TurnPolicy,
               template: str, fingerprint: Optional[dict] = None) -> Path:
    """Write (replace) `out_dir` atomically. fingerprint: `model_fingerprint(model)` if already known
    (a server computes it once)."""
    meta = {"format": FORMAT, "fingerprint": fingerprint or model_fingerprint(model), "messages": state.messages,
            "tokens": [int(t) for t in state.tokens], "rendered": state.rendered, "turns": state.turns,
            "options": dataclasses.asdict(opts), "policy": dataclasses.asdict(policy), "chat_template": template}
    leaves = jax.tree.leaves(state.opt_state)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, deltas=np.asarray(state.deltas, np.float32),
                     **{f"opt_{i}": np.asarray(a) for i, a in enumerate(leaves)})
        (tmp / "state.json").write_text(json.dumps(meta))
    return Path(out_dir)


def read_state(src, model, fingerprint: Optional[dict] = None
               ) -> tuple[ConversationState, RewireOptions, TurnPolicy, str]:
    """-> (state, options, policy, template), or a StateError naming what is wrong. fingerprint:
    `model_fingerprint(model)` if already known."""
    src = Path(src)
    if not src.is_dir():
        raise StateError(f"conversation state {src} does not exist (or is not a directory)")
    missing = [f for f in FILES if not (src / f).is_file()]
    if missing:
        raise StateError(f"{src} is not a saved conversation: {', '.join(missing)} missing")
    try:
        meta = json.loads((src / "state.json").read_text())
        arrays = dict(np.load(src / "arrays.npz", allow_pickle=False))
    except Exception as e:
        raise StateError(f"conversation state {src} is corrupted ({type(e).__name__}: {e}); "
                         f"save it again or start a new conversation") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{src}/state.json is not a rewire-jax conversation (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    _check_model(src, meta["fingerprint"], model, fingerprint)
    try:
        opts = RewireOptions(**meta["options"])
        policy = TurnPolicy(**meta["policy"])
        deltas = np.asarray(arrays["deltas"], np.float32)
        fresh = fresh_opt_state(opts, deltas)
        leaves = [arrays[f"opt_{i}"] for i in range(len(jax.tree.leaves(fresh)))]
        if deltas.shape != (1, *model.config.delta_shape) or \
                [a.shape for a in leaves] != [a.shape for a in jax.tree.leaves(fresh)]:
            raise ValueError("array shapes do not match the model")
        opt_state = jax.tree.unflatten(jax.tree.structure(fresh), leaves)
        state = ConversationState(list(meta["messages"]), [int(t) for t in meta["tokens"]], str(meta["rendered"]),
                                  deltas, opt_state, int(meta["turns"]))
        template = str(meta["chat_template"])
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"conversation state {src} is corrupted ({type(e).__name__}: {e}); "
                         f"save it again or start a new conversation") from None
    if state.tokens and max(state.tokens) >= model.config.vocab_size:
        raise StateError(f"conversation state {src} is corrupted: token ids beyond the vocabulary")
    return state, opts, policy, template


def _check_model(src: Path, saved: dict, model, now: Optional[dict] = None) -> None:
    now = now or model_fingerprint(model)
    if saved.get("config") != now["config"] or saved.get("weights") != now["weights"]:
        what = "config" if saved.get("config") != now["config"] else "weights"
        raise StateError(f"conversation {src} was saved from model {saved.get('path') or '<unknown path>'} and does "
                         f"not belong to model {model.path or '<in-memory model>'} (their {what} differ); load "
                         f"it with the model it was saved from")


def as_batch_opt(opt_states: list) -> Any:
    """Per-conversation Adam states ([1, ...] leaves) -> one [n, ...] tree."""
    return jax.tree.map(lambda *a: np.concatenate(a, 0), *opt_states)


