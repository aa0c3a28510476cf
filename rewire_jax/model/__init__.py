"""The model: config, weight declarations, the flax.nnx modules, and the pure functions over them.

  config.py       ModelConfig (frozen, static under jit)
  weights.py      every weight declared once (shape, dtype, logical axes, init, HF key); layer plan
  nn.py           Params from the declarations; `Execution` (how a call runs)
  layers.py       norms, RoPE (+YaRN), blocked causal attention with its VJP (pure helpers)
  attention.py    GQAttention, MLAttention (modules)
  routers.py      Router modules, one per router kind (the router table), token confidence
  moe.py          MoEBlock (router + delta: the only place a delta is added, routing, experts), DenseMLP
  dispatch.py     expert dispatch paths (dense / gather / blocked / ragged / kernel; all exact; pure helpers)
  grouped.py      grouped matmul of sorted rows (jax.lax.ragged_dot or tokamax kernels; input gradient only)
  decoder.py      DecoderLayer, CausalLM, the module graph (ModelGraph) the jitted functions merge
  stack.py        the layer scan / unrolled stacks, KV cache layout, remat
  transformer.py  the functional API: embed, decoder_layer, run_layers, head, forward
  loss.py         next-token cross-entropy
"""
from .config import ConfigError, MLAConfig, ModelConfig, RopeConfig, RouterConfig
from .loss import cross_entropy, sequence_losses, span_nll, token_nll
from .attention import GQAttention, MLAttention
from .decoder import CausalLM, DecoderLayer, ModelGraph, from_config, graph_of, model_graph
from .moe import DenseMLP, MoEBlock, RouteOverride
from .nn import Execution
from .routers import ROUTERS, GroupLimited, Router, SigmoidGroup, SoftmaxTopK, TopKSoftmax
from .transformer import (batched_deltas, decoder_layer, embed, forward, head, positions_for, run_layers,
                          zero_deltas)
from .weights import declarations, init_params, layer_params, layer_plan, logical_axes, param_shapes

__all__ = ["CausalLM", "ConfigError", "DecoderLayer", "DenseMLP", "Execution", "GQAttention", "GroupLimited",
           "MLAConfig", "MLAttention", "ModelConfig", "ModelGraph", "MoEBlock", "ROUTERS", "RopeConfig",
           "RouteOverride", "Router", "RouterConfig", "SigmoidGroup", "SoftmaxTopK", "TopKSoftmax",
           "batched_deltas", "cross_entropy", "from_config", "graph_of", "model_graph",
           "declarations", "decoder_layer", "embed", "forward", "head", "init_params", "layer_params",
           "layer_plan", "logical_axes", "param_shapes", "positions_for", "run_layers", "sequence_losses",
           "span_nll", "token_nll", "zero_deltas"]
