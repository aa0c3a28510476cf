"""The model definitions as flax.nnx modules (they live in `rewire_jax.model`; gathered here).

    lm = rewire_jax.modules.from_config(cfg, rngs=nnx.Rngs(0))    # random weights
    lm = rewire_jax.load(path).module                              # loaded weights, no copies
    logits = lm(tokens, deltas)                                    # [B, T, V] fp32

See docs/flax.md for the module tree and how to swap or subclass a part (a router, an MoE block).
"""
from .model.attention import GQAttention, MLAttention
from .model.decoder import CausalLM, DecoderLayer, ModelGraph, from_config, graph_of, model_graph
from .model.moe import DenseMLP, MoEBlock
from .model.nn import Execution
from .model.routers import ROUTERS, GroupLimited, Router, SigmoidGroup, SoftmaxTopK, TopKSoftmax, router_for

__all__ = ["CausalLM", "DecoderLayer", "DenseMLP", "Execution", "GQAttention", "GroupLimited", "MLAttention",
           "ModelGraph", "MoEBlock", "ROUTERS", "Router", "SigmoidGroup", "SoftmaxTopK", "TopKSoftmax", "from_config",
           "graph_of", "model_graph", "router_for"]
