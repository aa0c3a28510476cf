"""rewire-jax: test-time rerouting ("rewiring") of Mixture-of-Experts LMs in pure JAX."""
from .api import Model, load
from .config import ModelConfig
from .model import forward, init_params, zero_deltas

__all__ = ["Model", "ModelConfig", "forward", "init_params", "load", "zero_deltas"]
__version__ = "0.1.0"
