"""The in-context routing optimisation (phase 1 of the paper's cycle), as one jitted call (two for
'hard' / 'reverse' selection).

    rewire = rewire_jax.rewirer(model.config)            # or Rewirer(config, RewireOptions(...))
    out = rewire.step(params, deltas, tokens)            # n Adam steps on the context
    deltas = out.deltas                                  # out.opt_state carries Adam across phases

A phase: n Adam steps on the router deltas, minimising next-token cross-entropy over the context,
with per-layer weights/selection computed once from the first step's forward (layer confidence,
Eq. 2-4). Gradients are taken w.r.t. the deltas only. The Adam update is optax's, vmapped over
(sequence, layer) so every layer has its own step count: a layer that is not selected gets no
moment update, no step and no decay, as torch.optim.Adam does for a parameter whose grad is None.
See shared/docs/rewiring-algorithm.md for every choice and README "Options".

Speed (same results as the plain path, which the tests check):
- Layers below the lowest *updated* layer do not change during a phase (their deltas are frozen
  and the model weights always are). With `cache_below=True` (default) their output is computed
  once per phase and the n steps run forward + backward only from there (`_steps_impl`, one
  compiled program per split point). The split is known before the phase for 'last_k' and
  'random'; for 'hard' / 'reverse' it comes from the first step's scores, so the first step
  (`_first_step_impl`) runs layer by layer keeping each layer's VJP, selects, then runs the
  backward only through the layers above the lowest selected one (a lax.switch per layer) and
  hands the hidden state at the split to the remaining n-1 steps. Split points are rounded down to
  quarters of the depth (SPLIT_GRID), so at most 4 such programs per context length.
  'soft' / 'all' update layer 0: nothing to skip.
- Numeric hyperparameters (lr, betas, eps, weight decay) are traced, not static: changing them
  does not recompile. Options that change the program (steps, selection, ...) are static.
- Weights are never differentiated: gradients are taken w.r.t. the deltas only.
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
from .model import get_module, positions_for

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
    cache_below: bool = True       # compute layers below the lowest updated layer once per phase

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


HYPER = ("lr", "weight_decay", "eps", "b1", "b2")   # traced inside the compiled phase
# fields that never reach the compiled phase (host-side cycle control)
_HOST_ONLY = ("interval", "persist_optimizer", "continuous", "seed")


def adam(opts: RewireOptions, hyper=None) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas, eps, weight_decay): L2 term added to the gradient before the moments.

    hyper: optional traced [5] array (lr, weight_decay, eps, b1, b2) overriding the option values.
    """
    lr, wd, eps, b1, b2 = (getattr(opts, n) for n in HYPER) if hyper is None else tuple(hyper[i] for i in range(5))
    return optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(b1, b2, eps), optax.scale(-lr))


def init_opt_state(opts: RewireOptions, deltas):
    """Per-(sequence, layer) Adam state for deltas [B, L, E]: counts [B, L], moments [B, L, E]."""
    return jax.vmap(jax.vmap(adam(opts).init))(deltas)


def sequence_losses(logits, tokens, lengths, reduction: str = "mean"):
    """Next-token CE per sequence. logits [B, T, V] fp32; tokens [B, T]; lengths [B] -> [B]."""
    logits = logits[:, :-1]
    lse = jax.nn.logsumexp(logits, axis=-1)                                        # [B, T-1]
    # the target logit as a masked sum, not take_along_axis: its gradient is elementwise
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == tokens[:, 1:, None]
    nll = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
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


def masked_adam_update(opts: RewireOptions, grads, deltas, state, weights, selected, hyper=None):
    """One Adam step on deltas [B, L, E] where only `selected` (sequence, layer) pairs move."""
    if opts.soft_mode == "grad":  # Eq. 7 literally: scale the gradient
        grads = grads * weights[..., None]
    updates, new_state = jax.vmap(jax.vmap(adam(opts, hyper).update))(grads, state, deltas)
    if opts.soft_mode == "lr":   # Sec. 3.3: scale the step (the layer's learning rate)
        updates = updates * weights[..., None]
    keep = lambda new, old: jnp.where(selected.reshape(selected.shape + (1,) * (new.ndim - 2)), new, old)
    return deltas + jnp.where(selected[..., None], updates, 0.0), jax.tree.map(keep, new_state, state)


SPLIT_GRID = 4   # split points per model (rounded down): bounds the programs compiled per length


class _Fns(NamedTuple):
    embed: Any
    layers: Any
    head: Any


def _model_fns(params, cfg: ModelConfig, dispatch: str) -> _Fns:
    module = get_module(cfg, dispatch)
    v = {"params": params}

    def layers(x, positions, deltas, start, stop):
        x, _, aux = module.apply(v, x, positions, deltas, start, stop, method="run_layers")
        return x, (aux.get("score") if aux else None)     # score [B, MoE layers run, T]

    return _Fns(lambda tokens: module.apply(v, tokens, method="embed"), layers,
                lambda x: module.apply(v, x, method="head"))


def _select(token_scores, lengths, active, random_mask, opts):
    """Token scores [B, L, T] -> (layer scores, weights, selected), fixed for the phase."""
    scores = layer_scores(token_scores, lengths, opts.confidence)
    w, sel = select_layers(scores, opts, random_mask)
    sel &= active[:, None]
    return scores, jnp.where(sel, w, 0.0), sel


def _head_loss(f, x, tokens, lengths, active, opts):
    per_seq = sequence_losses(f.head(x), tokens, lengths, opts.loss)
    # the batch loss is a sum over sequences: each sequence's deltas get their own gradient
    return jnp.sum(jnp.where(active, per_seq, 0.0)), per_seq


def split_grid(cfg: ModelConfig) -> int:
    return max(1, -(-cfg.num_layers // SPLIT_GRID))


def round_split(layer: int, cfg: ModelConfig) -> int:
    """Lowest updated decoder layer -> the split point used (rounded down to the grid)."""
    g = split_grid(cfg)
    return (min(int(layer), cfg.num_layers) // g) * g


def host_split(opts: RewireOptions, cfg: ModelConfig, random_mask) -> Optional[int]:
    """The split point when it is known before the phase runs (None: known only from the first
    step's scores, i.e. 'hard' / 'reverse'). 0 = nothing below to reuse."""
    if not opts.cache_below or opts.selection in ("soft", "all"):
        return 0
    Lm = cfg.num_moe_layers
    if opts.selection == "last_k":
        return round_split(cfg.moe_layers[Lm - min(opts.last_k, Lm)], cfg)
    if opts.selection == "random":
        rows = np.flatnonzero(np.asarray(random_mask))
        return round_split(cfg.moe_layers[rows[0]] if len(rows) else cfg.num_layers, cfg)
    return None


def _steps_impl(params, deltas, opt_state, tokens, lengths, active, random_mask, hyper, x_split, fixed,
                cfg: ModelConfig, opts: RewireOptions, dispatch: str, split: int, steps: int):
    """`steps` Adam steps on the layers >= split.

    x_split: the hidden state entering layer `split` (None: computed here, once: the layers below
    are frozen for the phase). fixed: (loss0, scores, weights, selected) when already known (None:
    fixed from the first step's forward, scores of the layers below from the pass computing x_split).
    """
    f = _model_fns(params, cfg, dispatch)
    B, Lm = deltas.shape[:2]
    positions = positions_for(tokens)
    below = None
    if x_split is None:
        x_split = f.embed(tokens)     # independent of the deltas: once per phase
        if split:
            x_split, below = f.layers(x_split, positions, deltas, 0, split)

    def loss_fn(d):
        x, sc = f.layers(x_split, positions, d, split, cfg.num_layers)
        loss, per_seq = _head_loss(f, x, tokens, lengths, active, opts)
        return loss, (per_seq, sc)

    def body(i, carry):
        d, s, fixed = carry
        (_, (per_seq, sc)), g = jax.value_and_grad(loss_fn, has_aux=True)(d)
        if fixed_known:
            fixed_now = fixed
        else:   # scores and weights come from the first step's forward and stay fixed for the phase
            tok_scores = sc if below is None else (below if sc is None else jnp.concatenate([below, sc], 1))
            new = (per_seq,) + _select(tok_scores, lengths, active, random_mask, opts)
            fixed_now = tuple(jnp.where(i == 0, n, o) for n, o in zip(new, fixed))
        d, s = masked_adam_update(opts, g, d, s, fixed_now[2], fixed_now[3], hyper)
        return d, s, fixed_now

    fixed_known = fixed is not None
    if not fixed_known:
        fixed = (jnp.zeros(B), jnp.zeros((B, Lm)), jnp.zeros((B, Lm)), jnp.zeros((B, Lm), bool))
    # one traced copy of forward+backward for all the steps
    d, s, fixed = jax.lax.fori_loop(0, steps, body, (deltas, opt_state, fixed))
    return PhaseOutput(d, s, fixed[0], fixed[1], fixed[2])


_steps_jit = jax.jit(_steps_impl, static_argnames=("cfg", "opts", "dispatch", "split", "steps"),
                     donate_argnames=("deltas", "opt_state"))


def _first_step_impl(params, deltas, opt_state, tokens, lengths, active, random_mask, hyper,
                     cfg: ModelConfig, opts: RewireOptions, dispatch: str):
    """Step 1 of a phase whose lowest selected layer is known only from this step's scores
    ('hard' / 'reverse'): a layer-by-layer forward keeping each layer's VJP, the selection, then a
    backward that runs only through the layers >= the lowest selected one (a lax.switch per layer;
    the layer's residuals enter the switch as operands, so nothing is copied).

    -> (PhaseOutput after one Adam step, selected, split point (traced), hidden state entering it)
    """
    f = _model_fns(params, cfg, dispatch)
    L = cfg.num_layers
    positions = positions_for(tokens)
    x = f.embed(tokens)
    hs, pulls, tok_scores = [x], [], []
    for i in range(L):
        if cfg.moe_index(i) is None:
            x, pull = jax.vjp(lambda x, i=i: f.layers(x, positions, deltas, i, i + 1)[0], x)
        elif i == 0:   # nothing below layer 0 needs a gradient: w.r.t. the deltas only
            (x, sc), pull = jax.vjp(lambda d: f.layers(hs[0], positions, d, 0, 1), deltas, has_aux=False)
            pull = (lambda p: lambda g: (None, p((g, jnp.zeros_like(sc)))[0]))(pull)
            tok_scores.append(sc)
        else:
            (x, sc), pull = jax.vjp(lambda x, d, i=i: f.layers(x, positions, d, i, i + 1), x, deltas)
            pull = (lambda p, z: lambda g: p((g, z)))(pull, jnp.zeros_like(sc))
            tok_scores.append(sc)
        hs.append(x)
        pulls.append(pull)
    (_, per_seq), pull_head = jax.vjp(lambda x: _head_loss(f, x, tokens, lengths, active, opts), x)
    scores, weights, selected = _select(jnp.concatenate(tok_scores, 1), lengths, active, random_mask, opts)
    layer_of_row = jnp.asarray(cfg.moe_layers, jnp.int32)
    lowest = jnp.min(jnp.where(selected, layer_of_row[None], L))
    split = (lowest // split_grid(cfg)) * split_grid(cfg)

    gx = pull_head((jnp.ones(()), jnp.zeros_like(per_seq)))[0]
    gd = jnp.zeros_like(deltas)
    for i in reversed(range(L)):
        moe = cfg.moe_index(i) is not None
        skip = lambda g: (jnp.zeros_like(g), jnp.zeros_like(deltas))

        def full(g, i=i, moe=moe):
            out = pulls[i](g)
            gxi = out[0] if out[0] is not None else jnp.zeros_like(g)
            return gxi, (out[1] if moe else jnp.zeros_like(deltas))

        def d_only(g, i=i, moe=moe):   # the lowest needed layer: no gradient w.r.t. its input
            return jnp.zeros_like(g), (pulls[i](g)[1] if moe else jnp.zeros_like(deltas))

        mode = jnp.where(i > lowest, 2, jnp.where(i == lowest, 1, 0))
        gx, gdi = jax.lax.switch(mode, [skip, d_only, full], gx)
        gd = gd + gdi
    d, s = masked_adam_update(opts, gd, deltas, opt_state, weights, selected, hyper)
    x_split = jnp.stack(hs)[split]
    return PhaseOutput(d, s, per_seq, scores, weights), selected, split, x_split


_first_step_jit = jax.jit(_first_step_impl, static_argnames=("cfg", "opts", "dispatch"),
                          donate_argnames=("deltas", "opt_state"))


def static_options(opts: RewireOptions) -> RewireOptions:
    """The part of the options that shapes the compiled phase (numeric hyperparameters are traced
    and host-side cycle controls never reach it), so changing those does not recompile."""
    defaults = RewireOptions()
    return opts.replace(**{n: getattr(defaults, n) for n in HYPER + _HOST_ONLY})


def hyper_array(opts: RewireOptions):
    return jnp.asarray([getattr(opts, n) for n in HYPER], jnp.float32)


def optimise_phase(params, deltas, opt_state, tokens, lengths, active, random_mask, cfg: ModelConfig,
                   opts: RewireOptions, dispatch: str = "auto") -> PhaseOutput:
    """All n Adam steps of one phase: one compiled call, or two for 'hard' / 'reverse' with
    cache_below (step 1 finds the lowest selected layer; the remaining steps start there).

    tokens [B, T] right-padded; lengths [B]; active [B] bool (finished sequences are frozen);
    deltas [B, L, E] and opt_state are donated. -> PhaseOutput with batched arrays.
    """
    hyper, so = hyper_array(opts), static_options(opts)
    split = host_split(opts, cfg, random_mask)
    if split is not None:
        return _steps_jit(params, deltas, opt_state, tokens, lengths, active, random_mask, hyper, None, None,
                          cfg=cfg, opts=so, dispatch=dispatch, split=split, steps=opts.steps)
    out, selected, split, x_split = _first_step_jit(params, deltas, opt_state, tokens, lengths, active,
                                                    random_mask, hyper, cfg=cfg, opts=so, dispatch=dispatch)
    if opts.steps == 1:
        return out
    split = int(split)   # a host sync: the remaining steps compile per split point (SPLIT_GRID of them)
    rest = _steps_jit(params, out.deltas, out.opt_state, tokens, lengths, active, random_mask, hyper, x_split,
                      (out.loss, out.scores, out.weights, selected), cfg=cfg, opts=so, dispatch=dispatch,
                      split=split, steps=opts.steps - 1)
    return rest


def bucket_length(n: int, cap: Optional[int] = None, minimum: int = 16, per_octave: int = 4) -> int:
    """Round a length up to one of `per_octave` buckets per power of two (16, 32, 48, 64, 80, 96, 112,
    128, 160, ..., 256, 320, 384, 448, 512, 640, ...): a growing context compiles O(per_octave *
    log T) programs and pads at most 1/per_octave of the work (power-of-two buckets pad up to 2x)."""
    n = max(n, 1)
    b = max(minimum, 1 << (n - 1).bit_length())
    if b > minimum and per_octave > 1:
        step = max(16, (b // 2) // per_octave)
        b = min(b, -(-n // step) * step)
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
