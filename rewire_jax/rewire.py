"""The in-context routing optimisation (phase 1 of the paper's cycle), as one jitted call.

    rewire = rewire_jax.rewirer(model.config)            # or Rewirer(config, RewireOptions(...))
    out = rewire.step(params, deltas, tokens)            # n Adam steps on the context
    deltas = out.deltas                                  # out.opt_state carries Adam across phases

A phase: n Adam steps on the router deltas, minimising next-token cross-entropy over the context,
with per-layer weights/selection computed once from the first step's forward (layer confidence,
Eq. 2-4). Gradients are taken w.r.t. the deltas only. The Adam update is optax's, vmapped over
(sequence, layer) so every layer has its own step count: a layer that is not selected gets no
moment update, no step and no decay, as torch.optim.Adam does for a parameter whose grad is None.
See shared/docs/rewiring-algorithm.md for every choice and README "Options".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import ModelConfig
from .model import forward

SELECTIONS = ("soft", "hard", "all", "random", "reverse", "last_k", "none")
CHOICES = {"selection": SELECTIONS, "soft_mode": ("lr", "grad"), "confidence": ("paper", "inverse"),
           "loss": ("mean", "sum")}


@dataclasses.dataclass(frozen=True)
class RewireOptions:
    """Options of the rewiring cycle; defaults are the paper's (see README "Options")."""

    steps: int = 5                 # Adam steps per phase (n)
    interval: int = 128            # tokens generated between phases (m)
    lr: float = 0.05
    weight_decay: float = 1e-8     # torch.optim.Adam L2 semantics: added to the gradient
    eps: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    selection: str = "soft"        # soft | hard | all | random | reverse | last_k | none
    ratio: float = 0.5             # fraction of layers kept by hard / random / reverse
    soft_mode: str = "lr"          # soft weights scale each layer's update ('lr') or gradient ('grad')
    confidence: str = "paper"      # layer score C_l (Eq. 3) or 1/C_l ('inverse')
    loss: str = "mean"             # CE over the context: mean or sum over target tokens
    persist_optimizer: bool = True  # keep Adam state across the phases of one generation
    continuous: bool = True        # re-optimise every `interval` tokens (False: only on the prompt)
    last_k: int = 5                # layers used by selection='last_k'
    seed: int = 0                  # for selection='random'

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(allowed)}")
        for name in ("steps", "interval", "last_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        for name in ("lr", "eps", "weight_decay"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.selection != "none"

    def replace(self, **kw) -> "RewireOptions":
        return dataclasses.replace(self, **kw)


class PhaseOutput(NamedTuple):
    deltas: Any        # [B, L_moe, E] (or [L_moe, E] if given unbatched)
    opt_state: Any     # Adam state to pass to the next phase
    loss: Any          # [B] context loss at the first step (before this phase's updates)
    scores: Any        # [B, L_moe] layer scores used for the selection
    weights: Any       # [B, L_moe] per-layer update weight (0 = not updated)


class NonFiniteDeltas(FloatingPointError):
    pass


def adam(opts: RewireOptions) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas, eps, weight_decay): L2 term added to the gradient before the moments."""
    return optax.chain(optax.add_decayed_weights(opts.weight_decay),
                       optax.scale_by_adam(opts.b1, opts.b2, opts.eps),
                       optax.scale(-opts.lr))


def init_opt_state(opts: RewireOptions, deltas):
    """Per-(sequence, layer) Adam state for deltas [B, L, E]: counts [B, L], moments [B, L, E]."""
    return jax.vmap(jax.vmap(adam(opts).init))(deltas)


def sequence_losses(logits, tokens, lengths, reduction: str = "mean"):
    """Next-token CE per sequence. logits [B, T, V] fp32; tokens [B, T]; lengths [B] -> [B]."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]         # [B, T-1]
    valid = jnp.arange(tokens.shape[1] - 1)[None] < (lengths[:, None] - 1)
    total = jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)
    if reduction == "sum":
        return total
    return total / jnp.maximum(lengths - 1, 1)


def layer_scores(token_scores, lengths, confidence: str):
    """token_scores [B, L, T] (Eq. 2) -> layer scores [B, L]: mean over valid tokens (Eq. 3)."""
    valid = jnp.arange(token_scores.shape[-1])[None, None] < lengths[:, None, None]
    c = jnp.sum(jnp.where(valid, token_scores, 0.0), -1) / jnp.maximum(lengths, 1)[:, None]
    # 'inverse' ranks layers by decisiveness: 1/C orders like -C but keeps soft weights positive
    return c if confidence == "paper" else 1.0 / c


def num_selected(opts: RewireOptions, num_layers: int) -> int:
    return max(1, int(math.floor(opts.ratio * num_layers)))


def random_layer_mask(opts: RewireOptions, num_layers: int, phase_index: int) -> np.ndarray:
    """selection='random': the layer set of phase p is a seeded permutation prefix (host side)."""
    chosen = np.random.default_rng([opts.seed, phase_index]).permutation(num_layers)[:num_selected(opts, num_layers)]
    mask = np.zeros(num_layers, bool)
    mask[chosen] = True
    return mask


def select_layers(scores, opts: RewireOptions, random_mask):
    """scores [B, L] -> (weights [B, L] fp32, selected [B, L] bool). Ties go to the lower layer."""
    B, Lm = scores.shape
    if opts.selection == "soft":
        return scores / jnp.sum(scores, -1, keepdims=True), jnp.ones((B, Lm), bool)
    if opts.selection in ("hard", "reverse"):
        # lax.top_k puts the lower index first among equal values
        _, idx = jax.lax.top_k(scores if opts.selection == "hard" else -scores, num_selected(opts, Lm))
        sel = jnp.any(jax.nn.one_hot(idx, Lm, dtype=bool), axis=1)
    elif opts.selection == "all":
        sel = jnp.ones((B, Lm), bool)
    elif opts.selection == "random":
        sel = jnp.broadcast_to(random_mask, (B, Lm))
    elif opts.selection == "last_k":
        sel = jnp.broadcast_to(jnp.arange(Lm) >= Lm - min(opts.last_k, Lm), (B, Lm))
    else:
        raise ValueError(f"selection {opts.selection!r} does not optimise")
    return sel.astype(jnp.float32), sel


def masked_adam_update(opts: RewireOptions, grads, deltas, state, weights, selected):
    """One Adam step on deltas [B, L, E] where only `selected` (sequence, layer) pairs move."""
    if opts.soft_mode == "grad":  # Eq. 7 literally: scale the gradient
        grads = grads * weights[..., None]
    updates, new_state = jax.vmap(jax.vmap(adam(opts).update))(grads, state, deltas)
    if opts.soft_mode == "lr":   # Sec. 3.3: scale the step (the layer's learning rate)
        updates = updates * weights[..., None]
    keep = lambda new, old: jnp.where(selected.reshape(selected.shape + (1,) * (new.ndim - 2)), new, old)
    return deltas + jnp.where(selected[..., None], updates, 0.0), jax.tree.map(keep, new_state, state)


@functools.partial(jax.jit, static_argnames=("cfg", "opts"), donate_argnames=("deltas", "opt_state"))
def optimise_phase(params, deltas, opt_state, tokens, lengths, active, random_mask, cfg: ModelConfig,
                   opts: RewireOptions):
    """All n Adam steps of one phase in one compiled call.

    tokens [B, T] right-padded; lengths [B]; active [B] bool (finished sequences are frozen);
    deltas [B, L, E]. -> PhaseOutput with batched arrays.
    """
    def loss_fn(d):
        logits, aux = forward(params, tokens, d, cfg)
        per_seq = sequence_losses(logits, tokens, lengths, opts.loss)
        # the batch loss is a sum over sequences: each sequence's deltas get their own gradient
        return jnp.sum(jnp.where(active, per_seq, 0.0)), (per_seq, aux["score"])

    B, Lm = deltas.shape[:2]

    def body(i, carry):
        d, s, loss0, scores, weights, selected = carry
        (_, (per_seq, tok_scores)), g = jax.value_and_grad(loss_fn, has_aux=True)(d)
        # scores and weights come from the first step's forward and stay fixed for the phase
        first = i == 0
        new_scores = layer_scores(tok_scores, lengths, opts.confidence)
        new_w, new_sel = select_layers(new_scores, opts, random_mask)
        new_sel &= active[:, None]
        scores = jnp.where(first, new_scores, scores)
        selected = jnp.where(first, new_sel, selected)
        weights = jnp.where(first, jnp.where(new_sel, new_w, 0.0), weights)
        loss0 = jnp.where(first, per_seq, loss0)
        d, s = masked_adam_update(opts, g, d, s, weights, selected)
        return d, s, loss0, scores, weights, selected

    init = (deltas, opt_state, jnp.zeros(B), jnp.zeros((B, Lm)), jnp.zeros((B, Lm)), jnp.zeros((B, Lm), bool))
    # one traced copy of forward+backward (not one for step 1 and one for the rest): half the compile
    deltas, opt_state, loss0, scores, weights, _ = jax.lax.fori_loop(0, opts.steps, body, init)
    return PhaseOutput(deltas, opt_state, loss0, scores, weights)


def bucket_length(n: int, cap: Optional[int] = None, minimum: int = 16) -> int:
    """Pad lengths to powers of two so a growing context compiles O(log T) programs."""
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return b if cap is None else min(b, max(cap, n))


class Rewirer:
    """Config + options bound together; `step(params, deltas, tokens)` runs one phase."""

    def __init__(self, config: ModelConfig, options: Optional[RewireOptions] = None, **overrides):
        self.config = config
        self.options = (options or RewireOptions()).replace(**overrides)

    def init_opt_state(self, deltas):
        return init_opt_state(self.options, deltas)

    def step(self, params, deltas, tokens, *, lengths=None, opt_state=None, phase_index: int = 0,
             active=None) -> PhaseOutput:
        """One optimisation phase.

        tokens: [T] or [B, T] ints (right-padded when `lengths` [B] is given).
        deltas: [L_moe, E] or [B, L_moe, E]; the output keeps the same rank.
        opt_state: from a previous PhaseOutput (persist) or None (fresh Adam).
        """
        cfg, opts = self.config, self.options
        if not opts.enabled:
            raise ValueError("selection='none' is the baseline: there is nothing to optimise")
        tokens = np.asarray(tokens)
        unbatched = tokens.ndim == 1
        tokens = tokens[None] if unbatched else tokens
        B, T = tokens.shape
        if T == 0:
            raise ValueError("empty context: rewiring needs at least one token")
        lengths = np.full(B, T, np.int32) if lengths is None else np.asarray(lengths, np.int32)
        deltas = jnp.asarray(deltas, jnp.float32)
        deltas_b = deltas[None] if deltas.ndim == 2 else deltas
        if deltas_b.shape != (B, *cfg.delta_shape):
            raise ValueError(f"deltas shape {deltas.shape} does not match {cfg.delta_shape} / {(B, *cfg.delta_shape)}")
        Tb = bucket_length(T)
        padded = np.zeros((B, Tb), np.int32)
        padded[:, :T] = tokens
        state = opt_state if opt_state is not None else init_opt_state(opts, deltas_b)
        active = np.ones(B, bool) if active is None else np.asarray(active, bool)
        rmask = random_layer_mask(opts, cfg.num_moe_layers, phase_index)
        out = optimise_phase(params, jnp.array(deltas_b), state, jnp.asarray(padded), jnp.asarray(lengths),
                             jnp.asarray(active), jnp.asarray(rmask), cfg, opts)
        check_finite(out.deltas)
        if unbatched and deltas.ndim == 2:
            out = out._replace(deltas=out.deltas[0])
        return out


def check_finite(deltas):
    if not bool(jnp.all(jnp.isfinite(deltas))):
        raise NonFiniteDeltas(
            "router deltas became NaN/inf during optimisation; lower --lr, check the model's "
            "weights for NaN, or use float32 (--dtype float32)")


def rewirer(model_or_config, options: Optional[RewireOptions] = None, **overrides) -> Rewirer:
    cfg = getattr(model_or_config, "config", model_or_config)
    return Rewirer(cfg, options, **overrides)
