"""The rewiring options as command-line flags: one definition for every command that takes them
(`rewire-jax generate`, `rewire-jax serve`)."""
from __future__ import annotations

import argparse

from .rewire import CHOICES, RewireOptions


def add_rewire_arguments(p: argparse.ArgumentParser) -> None:
    """--steps ... --no-continuous, defaulting to RewireOptions()'s values (--seed is the caller's)."""
    d = RewireOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per phase (n)")
    p.add_argument("--interval", type=int, default=d.interval, help="tokens between phases (m)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--eps", type=float, default=d.eps)
    p.add_argument("--selection", choices=CHOICES["selection"], default=d.selection)
    p.add_argument("--ratio", type=float, default=d.ratio, help="fraction of layers for hard/random/reverse")
    p.add_argument("--soft-mode", choices=CHOICES["soft_mode"], default=d.soft_mode)
    p.add_argument("--confidence", choices=CHOICES["confidence"], default=d.confidence)
    p.add_argument("--loss", choices=CHOICES["loss"], default=d.loss)
    p.add_argument("--last-k", type=int, default=d.last_k)
    p.add_argument("--no-persist-optimizer", action="store_true", help="fresh Adam state every phase")
    p.add_argument("--no-continuous", action="store_true", help="optimise on the prompt only")


def rewire_options(a: argparse.Namespace) -> RewireOptions:
    """The RewireOptions of parsed flags (those of add_rewire_arguments, and --seed)."""
    return RewireOptions(steps=a.steps, interval=a.interval, lr=a.lr, weight_decay=a.weight_decay, eps=a.eps,
                         selection=a.selection, ratio=a.ratio, soft_mode=a.soft_mode, confidence=a.confidence,
                         loss=a.loss, persist_optimizer=not a.no_persist_optimizer,
                         continuous=not a.no_continuous, last_k=a.last_k, seed=a.seed)
