"""What every flax.nnx module of the model shares: Params made from the weight declarations, and
the execution settings a call takes.

A module's Params are its declarations (`weights.py`) made concrete: one `nnx.Param` per declared
weight, named as declared (so `nnx.to_pure_dict(nnx.state(module, nnx.Param))` is the param tree
that HF loading, export, converted checkpoints and sharding read), carrying the logical axes as
sharding metadata (`out_sharding`) and the HF key. Modules keep the *architecture* config
(`arch`) as static state; how a call runs (dispatch path, lean attention under remat, the mesh) is
an argument of the call (`Execution`), never module state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from flax import nnx

from .config import ModelConfig
from .weights import Weight, init_weight


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a module call runs; every choice gives the same values.

    dispatch: the routed-expert path ('auto' | 'dense' | 'gather' | 'blocked' | 'ragged' | 'kernel');
    lean: attention keeps no probabilities for the backward (inside a rematerialised layer);
    mesh: a jax.sharding.Mesh (expert-parallel MoE) or None."""

    dispatch: str = "auto"
    lean: bool = False
    mesh: Any = None

    @classmethod
    def of(cls, cfg: ModelConfig, dispatch: Optional[str] = None) -> "Execution":
        return cls(dispatch or cfg.dispatch, cfg.remat == "layer", cfg.mesh)


def arch(cfg: ModelConfig) -> ModelConfig:
    """The architecture part of a config (what modules keep): execution fields at their defaults."""
    if (cfg.dispatch, cfg.scan_layers, cfg.remat, cfg.mesh, cfg.modules) == ("auto", None, "auto", None, None):
        return cfg
    return cfg.replace(dispatch="auto", scan_layers=None, remat="auto", mesh=None, modules=None)


def stacked(decls: dict, repeats: Optional[int]) -> dict:
    """Declarations with a leading [repeats] ("layers") axis, or as they are for repeats=None."""
    if repeats is None:
        return decls
    return jax.tree.map(lambda w: w.stacked(repeats), decls, is_leaf=lambda x: isinstance(x, Weight))


def declare(module: nnx.Module, decls: dict, cfg: ModelConfig, weights: Optional[dict] = None,
            rngs: Optional[nnx.Rngs] = None) -> None:
    """One nnx.Param per declared weight, as an attribute of `module` named as declared: the array
    given in `weights` (loaded or initialised elsewhere; never copied), else a fresh one made by
    the declaration's init from `rngs`."""
    for name, w in decls.items():
        if weights is not None:
            value = weights[name]
        elif rngs is not None:
            value = init_weight(w, cfg, rngs.params())
        else:
            raise ValueError(f"{type(module).__name__}: pass weights=... or rngs=nnx.Rngs(...) to make its Params")
        setattr(module, name, nnx.Param(value, out_sharding=w.axes, hf=w.hf, eager_sharding=False))


def value(module: nnx.Module, name: str):
    """The array of Param `name` of `module`, or None if the module has no such weight."""
    var = getattr(module, name, None)
    return None if var is None else var[...]


def sub(weights: Optional[dict], name: str) -> Optional[dict]:
    return None if weights is None else weights[name]
