"""The rewiring cycle, written once: a small state carried between phases and one function that
runs a phase on a context. `Rewirer.step`, `generate`, the experiments and the evaluation harness
all go through `run_phase`.

    state = start_cycle(cfg, opts, batch)                     # zero deltas, fresh Adam, phase 0
    state, out = run_phase(params, state, tokens, lengths, cfg, opts)   # n Adam steps on the context
    state.deltas                                              # [B, L_moe, E] for decoding / scoring

`run_phase` pads the context to its length bucket (one compiled program per bucket), starts a
fresh Adam unless `persist_optimizer`, seeds `selection='random'` with the phase index, and stops
with `NonFiniteDeltas` if the deltas leave the finite range. When to run a phase is the caller's
schedule (`RewireOptions.wants_phase`: on the prompt, then every `interval` tokens if continuous).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from ..model import batched_deltas
from ..model.config import ModelConfig
from .options import NonFiniteDeltas, PhaseOutput, RewireOptions
from .phase import optimise_phase
from .selection import init_opt_state, random_layer_mask


class CycleState(NamedTuple):
    """What a batch of rewired sequences carries from one phase to the next (consumed by run_phase:
    its arrays are donated to the compiled phase)."""

    deltas: Any         # [B, L_moe, E] fp32
    opt_state: Any      # per-(sequence, layer) Adam state
    phase_index: int    # phases run so far (seeds selection='random')


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


def check_finite(deltas):
    if not bool(jnp.all(jnp.isfinite(deltas))):
        raise NonFiniteDeltas(
            "router deltas became NaN/inf during optimisation; lower --lr, check the model's "
            "weights for NaN, or use float32 (--dtype float32)")


def start_cycle(cfg: ModelConfig, opts: RewireOptions, batch: int, deltas=None, opt_state=None) -> CycleState:
    """Deltas (default zeros; [L_moe, E] or [B, L_moe, E]) with a fresh Adam state (or `opt_state`,
    one per sequence as `init_opt_state` lays it out: to continue a cycle, e.g. a conversation's
    next turn), phase 0."""
    d = jnp.array(batched_deltas(deltas, batch, cfg))
    check_finite(d)
    fresh = init_opt_state(opts, d)
    if opt_state is None:
        return CycleState(d, fresh, 0)
    return CycleState(d, checked_opt_state(opt_state, fresh), 0)


def checked_opt_state(opt_state, like):
    """opt_state as device arrays (copies: a phase donates its input), with a clear error if its
    tree or shapes differ from `like` (a fresh state for the same deltas)."""
    import jax
    got, want = jax.tree.structure(opt_state), jax.tree.structure(like)
    shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(opt_state)]
    if got != want or shapes != [tuple(a.shape) for a in jax.tree.leaves(like)]:
        raise ValueError(f"opt_state does not match these deltas: leaves {shapes}, expected "
                         f"{[tuple(a.shape) for a in jax.tree.leaves(like)]} (an Adam state from init_opt_state "
                         f"for [B, L_moe, E] deltas)")
    return jax.tree.map(lambda a, f: jnp.array(a, f.dtype), opt_state, like)


def run_phase(params, state: CycleState, tokens, lengths, cfg: ModelConfig, opts: RewireOptions,
              active=None, dispatch: Optional[str] = None) -> tuple[CycleState, PhaseOutput]:
    """One optimisation phase on the context `tokens [B, T]` (right-padded; `lengths [B]`).

    active [B] bool (default all): inactive rows (finished sequences) keep their deltas and state.
    -> (next state, PhaseOutput with batched arrays: loss before the phase, layer scores, weights).
    """
    B, T = tokens.shape
    Tb = bucket_length(T)
    tokens = jnp.asarray(tokens, jnp.int32)
    if Tb != T:
        tokens = jnp.pad(tokens, ((0, 0), (0, Tb - T)))
    opt_state = state.opt_state if opts.persist_optimizer else init_opt_state(opts, state.deltas)
    active = jnp.ones(B, bool) if active is None else jnp.asarray(active, bool)
    rmask = jnp.asarray(random_layer_mask(opts, cfg.num_moe_layers, state.phase_index))
    out = optimise_phase(params, state.deltas, opt_state, tokens, jnp.asarray(lengths, jnp.int32), active, rmask,
                         cfg, opts, dispatch)
    check_finite(out.deltas)
    return CycleState(out.deltas, out.opt_state, state.phase_index + 1), out


class Rewirer:
    """Config + options bound together; `step(params, deltas, tokens)` runs one phase."""

    def __init__(self, config: ModelConfig, options: Optional[RewireOptions] = None, **overrides):
        self.config = config
        self.options = (options or RewireOptions()).replace(**overrides)

    def init_opt_state(self, deltas):
        return init_opt_state(self.options, deltas)

    def step(self, params, deltas, tokens, *, lengths=None, opt_state=None, phase_index: int = 0,
             active=None) -> PhaseOutput:
        """One optimisation phase: the options' `steps` Adam updates of the deltas on the
        next-token loss of `tokens`, in one compiled call (two for `hard` / `reverse` selection).

        params: the model's parameter pytree (`model.params`).
        tokens: [T] or [B, T] ints (right-padded when `lengths` [B] is given).
        deltas: [L_moe, E] or [B, L_moe, E]; the output keeps the same rank.
        opt_state: from a previous PhaseOutput (persist) or None (fresh Adam).
        phase_index: seeds `selection="random"` (the layer set of phase p).
        active: [B] bool (default all): inactive rows keep their deltas and Adam state.
        Returns a `PhaseOutput` (deltas, opt_state, loss [B] before the updates, scores and
        weights [B, L_moe]). Raises ValueError for `selection="none"`, an empty context or deltas
        of the wrong shape.
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
        deltas_b = jnp.array(deltas_b)   # a copy: the phase donates its input
        state = CycleState(deltas_b, opt_state if opt_state is not None else init_opt_state(opts, deltas_b),
                           phase_index)
        _, out = run_phase(params, state, tokens, lengths, cfg, opts.replace(persist_optimizer=True), active)
        if unbatched and deltas.ndim == 2:
            out = out._replace(deltas=out.deltas[0])
        return out


def rewirer(model_or_config, options: Optional[RewireOptions] = None, **overrides) -> Rewirer:
    """A `Rewirer` for a model: its config bound to rewiring options (no params are held).

    model_or_config: a `Model` (its `.config` is used) or a `ModelConfig`.
    options: a `RewireOptions` (default: the paper's defaults); `**overrides` replace fields of it,
    e.g. `rewirer(model, selection="hard", ratio=0.25)`.
    Use `rewirer(...).step(model.params, deltas, tokens)` to run one optimisation phase.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    return Rewirer(cfg, options, **overrides)
