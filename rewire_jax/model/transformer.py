"""The model as pure functions of (params, config), derived from the flax.nnx modules.

Params are the plain nested dict declared in `weights.py`: the Param state of `decoder.CausalLM`.
Each function merges the config's module graph (`decoder.model_graph`: the stock modules, or a
customised model's) over the params inside the trace and calls the module, so the math has one
implementation (the modules) and every jitted program takes the param dict. The deltas are an
explicit input, `deltas [B, L_moe, E]` (row r: decoder layer `cfg.moe_layers[r]`); see
`stack.py` for the layer scan and the KV cache layout.
"""
from __future__ import annotations

from typing import Optional

from flax import nnx

from .config import ModelConfig
from .decoder import (batched_deltas, batched_route, model_graph, run_model, top_module,  # noqa: F401
                      zero_deltas)
from .moe import RouteOverride
from .stack import (REMAT_AUTO_TOKENS, UNROLL_MAX, call_layer, join_cache, positions_for,  # noqa: F401
                    prepare_params, run_stacks, scan_stack, split_cache, split_layers, use_remat, write_layer_cache,
                    write_rows)
from .weights import stack_of


def embed(params, tokens, cfg: ModelConfig):
    """tokens [B, T] int -> x [B, T, d]."""
    return top_module(cfg, params).embed_tokens(tokens)


def head(params, x, cfg: ModelConfig):
    """Final norm + LM head: x [B, T, d] -> fp32 logits [B, T, V]."""
    return top_module(cfg, params).head(x)


def decoder_layer(p, x, positions, delta, cfg: ModelConfig, layer: int, cache=None, kv_valid=None,
                  dispatch: Optional[str] = None, expert_layer=None, route=None):
    """Decoder layer `layer`'s module over its weights p (unstacked, except the routed experts' when
    expert_layer indexes their stack): -> (x [B, T, d], new cache rows, aux or None). delta [B, E] or
    None; route: None or this layer's (target [B, E], alpha [B], start [B])."""
    s, _, j = stack_of(cfg, layer)
    return call_layer(model_graph(cfg).layers[s][j], p, x, positions, delta, cfg, cache, kv_valid, dispatch,
                      expert_layer, route)


def run_layers(params, x, positions, deltas, cfg: ModelConfig, start: int = 0, stop: Optional[int] = None,
               cache=None, kv_valid=None, dispatch: Optional[str] = None, route: Optional[RouteOverride] = None):
    """Decoder layers [start, stop) (static). x [B, T, d]; deltas [B, L_moe, E]; route: None or a
    `RouteOverride` with [B, ...] arrays (see moe.RouteOverride).

    -> (x, cache, aux): with `cache` given (decode), the cache with this chunk's rows written in;
    without, the chunk's rows as a cache tree ([repeats, B, T, ...] leaves) when every layer ran
    (prefill), else None; aux stacked over the MoE layers run along axis 1 ({} if none).
    """
    return run_stacks(model_graph(cfg).layers, params, x, positions, deltas, cfg, start, stop, cache, kv_valid,
                      dispatch, route)


def forward(params, tokens, deltas, cfg: ModelConfig, positions=None, kv_valid=None,
            dispatch: Optional[str] = None, route: Optional[RouteOverride] = None):
    """Full (teacher-forced) forward, no cache. tokens [B, T] -> (logits [B, T, V] fp32, aux).
    positions [B, T] (default 0..T-1) must be strictly increasing integers along T. route: None or
    a `RouteOverride` ([B, ...] arrays). aux: {'logits' [B, L_moe, T, E] router logits (+ delta),
    'idx' [B, L_moe, T, k] the experts used, 'score' [B, L_moe, T]}."""
    logits, _, aux = run_model(params, tokens, deltas, cfg, positions, kv_valid, dispatch, route)
    return logits, aux


def module(params, cfg: ModelConfig):
    """The CausalLM module of `cfg`'s graph over `params` (no copies)."""
    return nnx.merge(model_graph(cfg).full, params)
