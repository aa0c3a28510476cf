"""rewire-jax: test-time rerouting ("rewiring") of Mixture-of-Experts LMs in pure JAX."""
from . import rewire
from .api import Model, load
from .config import ModelConfig
from .decode import Sampling
from .generate import GenerationResult, PhaseRecord, generate
from .model import forward, init_params, zero_deltas
from .rewire import PhaseOutput, RewireOptions, Rewirer, rewirer

__all__ = ["GenerationResult", "Model", "ModelConfig", "PhaseOutput", "PhaseRecord", "RewireOptions",
           "Rewirer", "Sampling", "forward", "generate", "init_params", "load", "rewire", "rewirer",
           "zero_deltas"]
__version__ = "0.1.0"
