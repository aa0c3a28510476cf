"""rewire-jax: test-time rerouting ("rewiring") of Mixture-of-Experts LMs in pure JAX.

Packages: `model` (config, weight declarations, the flax.nnx modules and the functions over them;
`modules` gathers the modules), `io` (HF and converted
checkpoints), `rewire` (the optimisation phase and cycle), `generation` (prefill, decode, generate),
`analysis`, `experiments`, `bench`. See docs/architecture.md.
"""
import sys as _sys

from . import modules, rewire
from .api import Model, load
from .conversation import Conversation, TurnPolicy, reply_many
from .generation import GenerationResult, PhaseRecord, QueueResult, Sampling, generate, generate_queue
from .model import ModelConfig, forward, init_params, zero_deltas
from .model.decoder import CausalLM, from_config
from .rewire import PhaseOutput, RewireOptions, Rewirer, rewirer

# Deprecated module paths (before 0.2 every module sat at the top level); they keep importing.
import importlib as _importlib  # noqa: E402

_decode = _importlib.import_module(f"{__name__}.generation.decode")   # the package exports the function
from .io import checkpoint as _checkpoint, export as _export, families as _families, mxfp4 as _mxfp4  # noqa: E402
from .model import attention as _attention, dispatch as _dispatch, layers as _layers, routers as _routers  # noqa: E402

from .io import hf as _hf  # noqa: E402
from .bench import perf as _perf  # noqa: E402

for _old, _new in {"decode": _decode, "checkpoint": _checkpoint, "export": _export, "mxfp4": _mxfp4,
                   "config": _families, "attention": _attention, "moe": _dispatch, "layers": _layers,
                   "routers": _routers, "hf_io": _hf, "perf": _perf}.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _new)
    globals().setdefault(_old, _new)

__all__ = ["CausalLM", "Conversation", "GenerationResult", "Model", "ModelConfig", "PhaseOutput", "PhaseRecord",
           "QueueResult", "RewireOptions", "Rewirer", "Sampling", "TurnPolicy", "forward", "from_config", "generate",
           "generate_queue", "init_params", "load", "reply_many", "rewire", "rewirer",
           "zero_deltas"]
__version__ = "0.3.0"   # the only place the version is written (pyproject reads it; CHANGELOG.md)
