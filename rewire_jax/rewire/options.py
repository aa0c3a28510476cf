"""Options of the rewiring cycle (defaults: the paper's; every ambiguity of the paper is an option,
see docs/algorithm.md and shared/docs/rewiring-algorithm.md)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

SELECTIONS = ("soft", "hard", "all", "random", "reverse", "last_k", "none")
CHOICES = {"selection": SELECTIONS, "soft_mode": ("lr", "grad"), "confidence": ("paper", "inverse"),
           "loss": ("mean", "sum")}


@dataclasses.dataclass(frozen=True)
class RewireOptions:
    """Options of the rewiring cycle; defaults are the paper's. Every ambiguity of the paper is an
    option (docs/algorithm.md). Invalid values raise ValueError naming the field.

    Attributes:
        steps: Adam steps per phase (n).
        interval: tokens generated between phases (m).
        lr: Adam learning rate.
        weight_decay: L2 term added to the gradient before the moments (as `torch.optim.Adam`).
        eps: Adam epsilon.
        b1: Adam first-moment decay.
        b2: Adam second-moment decay.
        selection: which layers are updated: soft | hard | all | random | reverse | last_k | none.
        ratio: fraction of layers kept by hard / random / reverse: max(1, floor(ratio * L)).
        soft_mode: soft weights scale each layer's update ('lr') or its gradient ('grad').
        confidence: layer score C_l as in Eq. 3 ('paper') or 1 / C_l ('inverse').
        loss: next-token cross-entropy per sequence: 'mean' or 'sum' over target tokens.
        persist_optimizer: keep one Adam state per sequence across phases (False: fresh each phase).
        continuous: re-optimise every `interval` tokens (False: only on the prompt).
        last_k: layers used by selection='last_k'.
        seed: seeds selection='random'.
        cache_below: compute the layers below the lowest updated layer once per phase (same result).
    """

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

    def wants_phase(self, phases_done: int) -> bool:
        """The cycle's schedule: a phase on the prompt, then one per `interval` tokens if continuous."""
        return self.enabled and (phases_done == 0 or self.continuous)

    def replace(self, **kw) -> "RewireOptions":
        return dataclasses.replace(self, **kw)


class PhaseOutput(NamedTuple):
    """What one optimisation phase returns (`Rewirer.step`, `rewire.run_phase`)."""

    deltas: Any        # [B, L_moe, E] (or [L_moe, E] if given unbatched)
    opt_state: Any     # Adam state to pass to the next phase
    loss: Any          # [B] context loss at the first step (before this phase's updates)
    scores: Any        # [B, L_moe] layer scores used for the selection
    weights: Any       # [B, L_moe] per-layer update weight (0 = not updated)


class NonFiniteDeltas(FloatingPointError):
    """Router deltas became NaN/inf during optimisation."""


HYPER = ("lr", "weight_decay", "eps", "b1", "b2")   # traced inside the compiled phase
# fields that never reach the compiled phase (host-side cycle control)
_HOST_ONLY = ("interval", "persist_optimizer", "continuous", "seed")


def static_options(opts: RewireOptions) -> RewireOptions:
    """The part of the options that shapes the compiled phase (numeric hyperparameters are traced
    and host-side cycle controls never reach it), so changing those does not recompile."""
    defaults = RewireOptions()
    return opts.replace(**{n: getattr(defaults, n) for n in HYPER + _HOST_ONLY})


def hyper_array(opts: RewireOptions):
    return jnp.asarray([getattr(opts, n) for n in HYPER], jnp.float32)
