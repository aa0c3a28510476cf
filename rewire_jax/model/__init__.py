"""The model: config, weight declarations, and the transformer as pure functions.

  config.py       ModelConfig (frozen, static under jit)
  weights.py      every weight declared once (shape, dtype, logical axes, init, HF key); layer plan
  layers.py       norms, RoPE (+YaRN), blocked causal attention with its VJP
  attention.py    GQA and MLA attention
  moe.py          the MoE block: router + delta (the only place a delta is added) + experts
  routers.py      the router table (kind -> routing function), token confidence
  dispatch.py     expert dispatch paths (dense / gather / blocked / ragged; all exact)
  transformer.py  embed, decoder layer, scanned stacks, head, forward
  loss.py         next-token cross-entropy
"""
from .config import ConfigError, MLAConfig, ModelConfig, RopeConfig, RouterConfig
from .loss import cross_entropy, sequence_losses, span_nll, token_nll
from .transformer import (batched_deltas, decoder_layer, embed, forward, head, positions_for, run_layers,
                          zero_deltas)
from .weights import declarations, init_params, layer_params, layer_plan, logical_axes, param_shapes

__all__ = ["ConfigError", "MLAConfig", "ModelConfig", "RopeConfig", "RouterConfig", "batched_deltas", "cross_entropy",
           "declarations", "decoder_layer", "embed", "forward", "head", "init_params", "layer_params",
           "layer_plan", "logical_axes", "param_shapes", "positions_for", "run_layers", "sequence_losses",
           "span_nll", "token_nll", "zero_deltas"]
