"""The decoder-only MoE transformer as Flax (linen) modules, plus pure functional entry points.

Params are a plain nested dict (the linen variable tree). The router deltas are an explicit input,
never a parameter: `deltas [B, L_moe, E]` is added to the router logits of MoE layer l before the
softmax / top-k, so it moves both the choice of experts and their weights.

The KV cache is a list (one entry per decoder layer) of dicts of fixed-size buffers, whatever the
layer's attention module returns (GQA: `{'k', 'v'}` [B, S, K, D]; MLA: `{'latent' [B, S, R],
'k_pe' [B, S, Dr]}`); token t of sequence b lives in row t (right padding).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import layers as L
from .attention import DenseMLP, RMSNorm, dense, init_normal, make_attention
from .config import ModelConfig
from .moe import dispatch
from .routers import route

Params = Any


class SparseMoE(nn.Module):
    """Routed experts (+ optional shared expert) behind any router of rewire_jax/routers.py.

    The delta [B, E] is added to the router logits right after the linear (and the gpt-oss router
    bias), before any softmax / sigmoid / group choice / top-k. The shared expert and Qwen2-MoE's
    shared_expert_gate have no delta: they are not part of the [E] routed logits.
    """

    cfg: ModelConfig
    dispatch: str = "auto"

    @nn.compact
    def __call__(self, x, delta):
        """x [B, T, d]; delta [B, E] fp32 -> (y [B, T, d], router aux)"""
        c = self.cfg
        B, T, d = x.shape
        E, I, dt = c.num_experts, c.moe_intermediate_size, c.jnp_dtype
        logits = dense(E, c, c.router.bias, name="gate")(x).astype(jnp.float32) + delta[:, None, :]
        flat = logits.reshape(B * T, E)
        correction = None
        if c.router.kind == "sigmoid_group":  # DeepSeek-V3: moves the choice only (fp32 buffer)
            correction = self.param("e_score_correction_bias", nn.initializers.zeros, (E,), jnp.float32)
        weights, idx = route(flat, c, correction)
        experts = {
            "gate_proj": self.param("gate_proj", init_normal, (E, d, I), dt),
            "up_proj": self.param("up_proj", init_normal, (E, d, I), dt),
            "down_proj": self.param("down_proj", init_normal, (E, I, d), dt),
        }
        if c.expert_bias:
            experts["gate_bias"] = self.param("gate_bias", nn.initializers.zeros, (E, I), dt)
            experts["up_bias"] = self.param("up_bias", nn.initializers.zeros, (E, I), dt)
            experts["down_bias"] = self.param("down_bias", nn.initializers.zeros, (E, d), dt)
        y = dispatch(x.reshape(B * T, d), weights.astype(dt), idx, experts, self.dispatch,
                     c.expert_activation, c.swiglu_limit).reshape(B, T, d)
        if c.shared_expert_size:
            shared = DenseMLP(c, c.shared_expert_size, name="shared_expert")(x)
            if c.shared_expert_gate:
                shared = jax.nn.sigmoid(dense(1, c, name="shared_expert_gate")(x)) * shared
            y = y + shared
        aux = {"logits": logits, "idx": idx.reshape(B, T, -1),
               "score": L.token_confidence(flat, idx).reshape(B, T)}
        return y, aux


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    layer: int
    dispatch: str = "auto"

    def setup(self):
        c = self.cfg
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)
        self.self_attn = make_attention(c, self.layer)
        self.is_moe = self.layer in c.moe_layers
        self.mlp = SparseMoE(c, self.dispatch) if self.is_moe else DenseMLP(c, c.intermediate_size)

    def __call__(self, x, positions, delta, cache=None, kv_valid=None):
        attn, new_cache = self.self_attn(self.input_layernorm(x), positions, cache, kv_valid)
        h = x + attn
        if self.is_moe:
            ffn, aux = self.mlp(self.post_attention_layernorm(h), delta)
        else:
            ffn, aux = self.mlp(self.post_attention_layernorm(h)), None
        return h + ffn, new_cache, aux


class Transformer(nn.Module):
    cfg: ModelConfig
    dispatch: str = "auto"

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype,
                                     param_dtype=c.jnp_dtype, embedding_init=init_normal)
        self.layers = [DecoderLayer(c, i, self.dispatch) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, c)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def run_layers(self, x, positions, deltas, start: int = 0, stop: Optional[int] = None,
                   cache=None, kv_valid=None):
        """Decoder layers [start, stop). deltas [B, L_moe, E]; cache: list over ALL layers or None.

        -> (x, new cache entries for layers start..stop-1, aux stacked over the MoE layers run)
        """
        c = self.cfg
        stop = c.num_layers if stop is None else stop
        new_cache, auxes = [], []
        for i in range(start, stop):
            r = c.moe_index(i)
            delta = deltas[:, r] if r is not None else None
            x, entry, aux = self.layers[i](x, positions, delta, None if cache is None else cache[i], kv_valid)
            new_cache.append(entry)
            if aux is not None:
                auxes.append(aux)
        stacked = jax.tree.map(lambda *a: jnp.stack(a, axis=1), *auxes) if auxes else {}
        return x, new_cache, stacked

    def head(self, x):
        """Final norm + LM head -> fp32 logits [B, T, V]."""
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.cfg.tie_word_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions, deltas, cache=None, kv_valid=None):
        x, new_cache, aux = self.run_layers(self.embed(tokens), positions, deltas, cache=cache, kv_valid=kv_valid)
        return self.head(x), new_cache, aux


# -- functional API --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def get_module(cfg: ModelConfig, dispatch_method: str = "auto") -> Transformer:
    return Transformer(cfg, dispatch_method)


def init_params(cfg: ModelConfig, key) -> Params:
    """Random parameters (normal(0.02) matrices, unit norms), e.g. for training from scratch."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return get_module(cfg).init(key, tokens, positions_for(tokens), zero_deltas(cfg, 1))["params"]


def param_shapes(cfg: ModelConfig) -> Params:
    """Shapes/dtypes of the params without allocating them (jax.ShapeDtypeStruct tree)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def zero_deltas(cfg: ModelConfig, batch: Optional[int] = None):
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


def positions_for(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def forward(params: Params, tokens, deltas, cfg: ModelConfig, positions=None, kv_valid=None,
            dispatch_method: str = "auto"):
    """Full (teacher-forced) forward, no cache. tokens [B, T] -> (logits [B, T, V] fp32, aux).
    positions [B, T] (default 0..T-1) must be strictly increasing integers along T."""
    positions = positions_for(tokens) if positions is None else positions
    logits, _, aux = get_module(cfg, dispatch_method).apply(
        {"params": params}, tokens, positions, deltas, None, kv_valid)
    return logits, aux
