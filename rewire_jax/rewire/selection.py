"""Which layers a phase updates, and how much: layer scores (Eq. 2-3), the selections (soft /
hard / all / random / reverse / last_k), the per-layer masked Adam step, and the split point below
which nothing changes during a phase."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..model.config import ModelConfig
from .options import HYPER, RewireOptions

def adam(opts: RewireOptions, hyper=None) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas, eps, weight_decay): L2 term added to the gradient before the moments.

    hyper: optional traced [5] array (lr, weight_decay, eps, b1, b2) overriding the option values.
    """
    lr, wd, eps, b1, b2 = (getattr(opts, n) for n in HYPER) if hyper is None else tuple(hyper[i] for i in range(5))
    return optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(b1, b2, eps), optax.scale(-lr))


def init_opt_state(opts: RewireOptions, deltas):
    """Per-(sequence, layer) Adam state for deltas [B, L, E]: counts [B, L], moments [B, L, E]."""
    return jax.vmap(jax.vmap(adam(opts).init))(deltas)


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
