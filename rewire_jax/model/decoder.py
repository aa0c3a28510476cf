"""The decoder layer and the causal LM as flax.nnx modules, and their module graph.

    CausalLM                         embed [V, d], final_norm [d], lm_head [d, V] (absent when tied)
      stacks[s][j]: DecoderLayer     sub-layer j of stack s (`weights.layer_plan`), leaves [repeats, ...]
        input_norm, post_norm
        attn: GQAttention | MLAttention
        mlp:  MoEBlock (routing: a routers.Router) | DenseMLP

`nnx.to_pure_dict(nnx.state(lm, nnx.Param))` is the param tree of `weights.declarations` (same
paths), which HF loading, export, converted checkpoints and sharding read. The modules of a stack
hold its repeats' weights stacked, so a change to `stacks[s][j]` applies to every repeat of it.

The jitted functional API (`transformer.forward`, prefill, decode, the rewiring phase) takes the
plain param dict and a static config; `model_graph(cfg)` is the module graph it merges inside the
trace: the stock modules of the config, or those of a customised model (`cfg.modules`, set by
`Model.with_module`). Each graph is split once; no Module crosses a jit boundary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import layers as L
from .attention import attention_class
from .config import ModelConfig
from .moe import DenseMLP, MoEBlock, RouteOverride
from .nn import Execution, arch, declare, stacked, sub
from .stack import positions_for, run_stacks
from .weights import _layer_norms, init_params, layer_plan, model_weights, param_shapes


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)) (MoE or dense).

    `layer` (the decoder-layer index of the stack's first repeat) is only read for what is static:
    MoE or dense, and the attention window. repeats: None for one layer's weights, or the stack's
    repeat count (every Param then has a leading [repeats] axis)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, repeats: Optional[int] = None,
                 weights: Optional[dict] = None, rngs: Optional[nnx.Rngs] = None):
        self.cfg, self.layer = arch(cfg), layer
        declare(self, stacked(_layer_norms(cfg), repeats), cfg, weights, rngs)
        self.attn = attention_class(cfg)(cfg, cfg.window(layer), repeats=repeats, weights=sub(weights, "attn"),
                                         rngs=rngs)
        mlp = MoEBlock if cfg.is_moe(layer) else DenseMLP
        self.mlp = mlp(cfg, repeats=repeats, weights=sub(weights, "mlp"), rngs=rngs)

    @property
    def is_moe(self) -> bool:
        return self.cfg.is_moe(self.layer)

    def __call__(self, x, positions, delta=None, *, cache=None, kv_valid=None, route=None, expert_layer=None,
                 run: Execution = Execution()):
        """x [B, T, d]; positions [B, T]; delta [B, E] (MoE layers); cache: this layer's cache entry
        or None; route: None or this layer's routing override (target [B, E], alpha [B], start [B]);
        expert_layer: index into the experts' leading layer axis when they are passed stacked.
        -> (x [B, T, d], new cache rows, aux (MoE) or None)."""
        eps = self.cfg.rms_norm_eps
        with jax.named_scope("attention"):
            h, rows = self.attn(L.rms_norm(x, self.input_norm[...], eps), positions, cache, kv_valid, run.lean)
        h = x + h
        y = L.rms_norm(h, self.post_norm[...], eps)
        if self.is_moe:
            with jax.named_scope("moe"):
                override = None
                if route is not None:   # the override acts from position start[b] on
                    target, alpha, start = route
                    override = (target, alpha, positions >= start[:, None])
                y, aux = self.mlp(y, delta, expert_layer=expert_layer, override=override, run=run)
        else:
            with jax.named_scope("mlp"):
                y, aux = self.mlp(y), None
        return h + y, rows, aux


class CausalLM(nnx.Module):
    """A decoder-only MoE LM: embedding, the decoder layers in stacks, final norm and LM head.

    `lm(tokens, deltas)` -> logits [B, T, V] fp32 (jitted over the module's arrays; equal to
    `rewire_jax.forward`). weights: a param tree to hold (never copied), else random ones from
    `rngs` (`weights.init_params`)."""

    def __init__(self, cfg: ModelConfig, *, weights: Optional[dict] = None, rngs: Optional[nnx.Rngs] = None):
        self.cfg = arch(cfg)
        if weights is None:
            if rngs is None:
                raise ValueError("CausalLM: pass weights=... or rngs=nnx.Rngs(...)")
            weights = init_params(cfg, rngs.params())
        declare(self, model_weights(cfg), cfg, weights)
        self.stacks = nnx.Dict({
            str(s): nnx.Dict({str(j): DecoderLayer(cfg, st.layer(0, j), repeats=st.repeats,
                                                   weights=weights["stacks"][str(s)][str(j)])
                              for j in range(st.unit)})
            for s, st in enumerate(layer_plan(cfg))})

    def embed_tokens(self, tokens):
        """tokens [B, T] int -> x [B, T, d]."""
        with jax.named_scope("embed"):
            return jnp.take(self.embed[...].astype(self.cfg.jnp_dtype), tokens, axis=0)

    def head(self, x):
        """Final norm + LM head: x [B, T, d] -> fp32 logits [B, T, V]."""
        with jax.named_scope("lm_head"):
            x = L.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
            w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
            return jnp.dot(x, w.astype(x.dtype)).astype(jnp.float32)

    def decoder_layers(self) -> Iterator[tuple[int, int, DecoderLayer]]:
        """(stack, sub-layer, module) of every stack's sub-layers, in layer order."""
        for s, st in enumerate(layer_plan(self.cfg)):
            for j in range(st.unit):
                yield s, j, self.stacks[str(s)][str(j)]

    def moe_blocks(self) -> Iterator[MoEBlock]:
        """The MoE block of every stack sub-layer that has one (each covers its stack's repeats)."""
        for _, _, layer in self.decoder_layers():
            if layer.is_moe:
                yield layer.mlp

    def __call__(self, tokens, deltas=None, *, cache=None, route=None, positions=None, kv_valid=None,
                 dispatch: Optional[str] = None):
        """tokens [B, T] (or [T]) ints; deltas None | [L_moe, E] | [B, L_moe, E]; route None or a
        `RouteOverride`. -> logits [B, T, V] fp32; with `cache` (decode: a KV cache tree as
        `generation.prefill` makes it) -> (logits, the cache with this chunk's rows written)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        B = tokens.shape[0]
        cfg = self.cfg.replace(modules=graph_of(self))
        logits, new_cache, _ = _jit_run_model(nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens,
                                              batched_deltas(deltas, B, cfg), cfg, positions, kv_valid, dispatch,
                                              batched_route(route, B, cfg), cache)
        return logits if cache is None else (logits, new_cache)


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """A CausalLM split once: `full` its GraphDef (merge it over a param tree to get the module),
    `top` the same with the stacks left out (embed_tokens / head over any param tree, also one whose
    unrolled stacks are split per layer), `layers[s][j]` each stack sub-layer's GraphDef (merged over
    one repeat's weights inside the layer scan)."""

    full: Any
    top: Any
    layers: tuple


def graph_of(lm: CausalLM) -> ModelGraph:
    """The module graph of a (possibly customised) CausalLM."""
    if not isinstance(lm, CausalLM):
        raise TypeError(f"expected a rewire_jax CausalLM module, got {type(lm).__name__}")
    stacks = lm.stacks
    layers = tuple(tuple(nnx.graphdef(stacks[str(s)][str(j)]) for j in range(len(stacks[str(s)])))
                   for s in range(len(stacks)))
    lm.stacks = nnx.Dict({})
    try:
        top = nnx.graphdef(lm)
    finally:
        lm.stacks = stacks
    return ModelGraph(nnx.graphdef(lm), top, layers)


@functools.lru_cache(maxsize=64)
def stock_graph(cfg: ModelConfig) -> ModelGraph:
    """The module graph of the stock modules of an (architecture) config, nothing allocated."""
    return graph_of(CausalLM(cfg, weights=param_shapes(cfg)))


def model_graph(cfg: ModelConfig) -> ModelGraph:
    """The module graph a config runs: `cfg.modules` (a customised model) or the stock one."""
    return cfg.modules if cfg.modules is not None else stock_graph(arch(cfg))


def top_module(cfg: ModelConfig, params) -> CausalLM:
    """The CausalLM without its stacks, over `params`' embed / final_norm / lm_head (inside a trace:
    embed_tokens and head)."""
    return nnx.merge(model_graph(cfg).top, {k: v for k, v in params.items() if k != "stacks"})


def run_model(params, tokens, deltas, cfg: ModelConfig, positions=None, kv_valid=None,
              dispatch: Optional[str] = None, route=None, cache=None):
    """tokens [B, T] -> (logits [B, T, V] fp32, cache (with `cache`) or None, aux): embed, every
    decoder layer, head, by the config's module graph. deltas [B, L_moe, E]."""
    lm = top_module(cfg, params)
    positions = positions_for(tokens) if positions is None else positions
    x, new_cache, aux = run_stacks(model_graph(cfg).layers, params, lm.embed_tokens(tokens), positions, deltas, cfg,
                                   cache=cache, kv_valid=kv_valid, dispatch=dispatch, route=route)
    return lm.head(x), (new_cache if cache is not None else None), aux


_jit_run_model = jax.jit(run_model, static_argnames=("cfg", "dispatch"))


def zero_deltas(cfg: ModelConfig, batch: Optional[int] = None):
    """Deltas that change nothing: zeros [L_moe, E] (or [batch, L_moe, E]) float32, one row per MoE
    layer (`cfg.moe_layers`), one column per routed expert."""
    shape = cfg.delta_shape if batch is None else (batch, *cfg.delta_shape)
    return jnp.zeros(shape, jnp.float32)


def batched_deltas(deltas, batch: int, cfg: ModelConfig):
    """None | [L_moe, E] | [B, L_moe, E] -> [B, L_moe, E] fp32, with a clear error otherwise."""
    if deltas is None:
        return zero_deltas(cfg, batch)
    deltas = jnp.asarray(deltas, jnp.float32)
    if deltas.shape == cfg.delta_shape:
        return jnp.broadcast_to(deltas, (batch, *cfg.delta_shape))
    if deltas.shape != (batch, *cfg.delta_shape):
        raise ValueError(
            f"deltas have shape {deltas.shape}; expected {cfg.delta_shape} (L_moe, E) or "
            f"{(batch, *cfg.delta_shape)} (B, L_moe, E) for this model and batch")
    return deltas


def batched_route(route, batch: int, cfg: ModelConfig) -> Optional[RouteOverride]:
    """None | RouteOverride with unbatched ([L_moe, E], [L_moe], []) or batched ([B, L_moe, E],
    [B, L_moe], [B]) arrays -> None | RouteOverride with [B, ...] arrays (fp32, fp32, int32)."""
    if route is None:
        return None
    target, alpha, start = (jnp.asarray(a) for a in route)
    if target.shape == cfg.delta_shape:
        target, alpha, start = (jnp.broadcast_to(a, (batch, *a.shape)) for a in (target, alpha, start))
    want = ((batch, *cfg.delta_shape), (batch, cfg.num_moe_layers), (batch,))
    got = (target.shape, alpha.shape, start.shape)
    if got != want:
        raise ValueError(f"route override arrays have shapes {got}; expected {want} (target, alpha, start) "
                         f"for this model and batch, or the same without the batch axis")
    return RouteOverride(target.astype(jnp.float32), alpha.astype(jnp.float32), start.astype(jnp.int32))


def from_config(cfg: ModelConfig, *, rngs: Optional[nnx.Rngs] = None) -> CausalLM:
    """A CausalLM of this config with random weights (`weights.init_params` from rngs.params())."""
    return CausalLM(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
