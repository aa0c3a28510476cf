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
See shared/docs/rewiring-algorithm.md for every choice and docs/algorithm.md.

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

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..model import embed, head, positions_for, run_layers, sequence_losses
from ..model.transformer import split_layers
from ..model.config import ModelConfig
from .options import PhaseOutput, RewireOptions, hyper_array, static_options
from .selection import host_split, layer_scores, masked_adam_update, select_layers, split_grid

class _Fns(NamedTuple):
    embed: Any
    layers: Any
    head: Any


def _model_fns(params, cfg: ModelConfig, dispatch: Optional[str]) -> _Fns:
    params = split_layers(params, cfg)   # once, outside the steps' loop
    def layers(x, positions, deltas, start, stop):
        x, _, aux = run_layers(params, x, positions, deltas, cfg, start, stop, dispatch=dispatch)
        return x, (aux.get("score") if aux else None)     # score [B, MoE layers run, T]

    return _Fns(lambda tokens: embed(params, tokens, cfg), layers, lambda x: head(params, x, cfg))


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


def _steps_impl(params, deltas, opt_state, tokens, lengths, active, random_mask, hyper, x_split, fixed,
                cfg: ModelConfig, opts: RewireOptions, dispatch: Optional[str], split: int, steps: int):
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
                     cfg: ModelConfig, opts: RewireOptions, dispatch: Optional[str]):
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


def optimise_phase(params, deltas, opt_state, tokens, lengths, active, random_mask, cfg: ModelConfig,
                   opts: RewireOptions, dispatch: Optional[str] = None) -> PhaseOutput:
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
