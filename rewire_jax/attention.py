"""Attention modules (Flax linen) shared by every family, plus the small Dense / RMSNorm / MLP blocks.

Both attention modules share one contract: `__call__(x, positions, cache=None, kv_valid=None)`
-> (out [B, T, d], cache entry). With cache=None they attend within the chunk (prefill, training;
positions must increase along T, as `positions_for` makes them: causal blocks skip the rest)
and return this chunk's entry (a dict of [B, T, ...] arrays; decode.prefill pads it to the cache
length along axis 1). With a cache entry they write the chunk at `positions` and attend over the
whole buffer (decode). Token t of sequence b always lives in row t, so a sliding-window layer keeps
every row and simply masks keys older than the window: it stays exact past the window.

  GQAAttention  OLMoE, Qwen2/3-MoE, Mixtral, gpt-oss: caches {'k', 'v'} [B, S, K, D]
  MLAttention   DeepSeek-V2/V3: caches the normalised latent [B, S, R] and the roped key [B, S, Dr]
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import layers as L
from .config import ModelConfig, RopeConfig

init_normal = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    dim: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.dtype)
        return L.rms_norm(x, weight, self.eps)


def dense(features, cfg: ModelConfig, bias: bool = False, name=None):
    return nn.Dense(features, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
                    kernel_init=init_normal, name=name)


class DenseMLP(nn.Module):
    """SwiGLU MLP without biases: dense layers, shared experts."""

    cfg: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x):
        gate = dense(self.width, self.cfg, name="gate_proj")(x)
        up = dense(self.width, self.cfg, name="up_proj")(x)
        return dense(self.cfg.hidden_size, self.cfg, name="down_proj")(jax.nn.silu(gate) * up)


def _self_or_cached_mask(positions, cache_rows: Optional[int], kv_valid, window):
    """Mask for attending within the chunk (cache_rows None) or over a cache of `cache_rows` rows."""
    if cache_rows is None:
        return L.attention_mask(positions, positions, kv_valid, window)
    k_pos = jnp.broadcast_to(jnp.arange(cache_rows), (positions.shape[0], cache_rows))
    return L.attention_mask(positions, k_pos, window=window)


class GQAAttention(nn.Module):
    """Grouped-query attention with RoPE; q/k/v (and o) biases, flat or per-head q/k norm,
    clip_qkv, a sliding window and attention sinks as the config asks."""

    cfg: ModelConfig
    layer: int = 0

    def setup(self):
        c = self.cfg
        self.q_proj = dense(c.num_heads * c.head_dim, c, c.attention_bias)
        self.k_proj = dense(c.num_kv_heads * c.head_dim, c, c.attention_bias)
        self.v_proj = dense(c.num_kv_heads * c.head_dim, c, c.attention_bias)
        self.o_proj = dense(c.hidden_size, c, c.o_proj_bias)
        if c.qk_norm == "flat":  # OLMoE: one RMSNorm over all heads, before the head split
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps, c.jnp_dtype)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps, c.jnp_dtype)
        elif c.qk_norm == "head":  # Qwen3: per head, after the split
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype)
        if c.attention_sinks:
            self.sinks = self.param("sinks", init_normal, (c.num_heads,), c.jnp_dtype)

    def __call__(self, x, positions, cache=None, kv_valid=None):
        """x [B, T, d]; positions [B, T]. -> (out [B, T, d], cache entry {'k','v'})"""
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm == "flat":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, T, c.num_heads, c.head_dim)
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = L.rope_cos_sin(positions, c.rope, c.rope.dim or c.head_dim)
        q, k = L.apply_rope(q, cos, sin, c.rope.interleaved), L.apply_rope(k, cos, sin, c.rope.interleaved)
        if cache is None:
            new = {"k": k, "v": v}
        else:
            new = {"k": L.write_cache(cache["k"], k, positions[:, 0]),
                   "v": L.write_cache(cache["v"], v, positions[:, 0])}
            k, v = new["k"], new["v"]
        mask = _self_or_cached_mask(positions, None if cache is None else k.shape[1], kv_valid,
                                    c.window(self.layer))
        out = L.attend(q, k, v, mask, c.head_dim ** -0.5, self.sinks if c.attention_sinks else None,
                       causal=cache is None, window=c.window(self.layer))
        return self.o_proj(out.reshape(B, T, -1)), new


def mla_softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """DeepSeek: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (0.1147 for
    V2-Lite); HF applies the correction only for non-default rope with a truthy mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention.

    q = q_proj(x) or q_b(norm(q_a(x))) -> [H, Dn + Dr]; ckv = kv_a(x) = [latent R | rope key Dr];
    c = norm(latent) is expanded per head by kv_b into (k_nope Dn, v Dv); the single rope key is
    shared by all heads. The cache keeps only c and the roped key; decoding attends in latent space
    (kv_b absorbed into q and into the output), which is the same sum re-associated.
    """

    cfg: ModelConfig
    layer: int = 0

    def setup(self):
        c, m = self.cfg, self.cfg.mla
        H = c.num_heads
        if m.q_lora_rank is None:
            self.q_proj = dense(H * m.qk_head_dim, c)
        else:
            self.q_a_proj = dense(m.q_lora_rank, c, c.attention_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6, c.jnp_dtype)  # eps hard-coded in HF
            self.q_b_proj = dense(H * m.qk_head_dim, c)
        self.kv_a_proj_with_mqa = dense(m.kv_lora_rank + m.qk_rope_head_dim, c, c.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6, c.jnp_dtype)
        self.kv_b_proj = dense(H * (m.qk_nope_head_dim + m.v_head_dim), c)
        self.o_proj = dense(c.hidden_size, c, c.attention_bias)

    def _project(self, x, positions):
        """-> q_nope [B,T,H,Dn], q_pe [B,T,H,Dr] (roped), latent [B,T,R], k_pe [B,T,Dr] (roped)."""
        c, m = self.cfg, self.cfg.mla
        B, T, _ = x.shape
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, c.num_heads, m.qk_head_dim)
        q_nope, q_pe = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., :m.kv_lora_rank])
        k_pe = ckv[..., m.kv_lora_rank:][:, :, None, :]
        cos, sin = L.rope_cos_sin(positions, c.rope, m.qk_rope_head_dim)
        q_pe = L.apply_rope(q_pe, cos, sin, c.rope.interleaved)
        k_pe = L.apply_rope(k_pe, cos, sin, c.rope.interleaved)[:, :, 0]
        return q_nope, q_pe, latent, k_pe

    def __call__(self, x, positions, cache=None, kv_valid=None):
        """x [B, T, d]; positions [B, T] -> (out [B, T, d], cache entry {'latent', 'k_pe'})"""
        c, m = self.cfg, self.cfg.mla
        B, T, _ = x.shape
        H, Dn = c.num_heads, m.qk_nope_head_dim
        scale = mla_softmax_scale(c.rope, m.qk_head_dim)
        q_nope, q_pe, latent, k_pe = self._project(x, positions)
        if cache is None:  # expand the latent per head, exactly as HF does
            kv = self.kv_b_proj(latent).reshape(B, T, H, Dn + m.v_head_dim)
            k = jnp.concatenate([kv[..., :Dn], jnp.broadcast_to(k_pe[:, :, None], (B, T, H, m.qk_rope_head_dim))], -1)
            q = jnp.concatenate([q_nope, q_pe], -1)
            mask = L.attention_mask(positions, positions, kv_valid, c.window(self.layer))
            out = L.attend(q, k, kv[..., Dn:], mask, scale, causal=True, window=c.window(self.layer))
            return self.o_proj(out.reshape(B, T, -1)), {"latent": latent, "k_pe": k_pe}
        new = {"latent": L.write_cache(cache["latent"], latent, positions[:, 0]),
               "k_pe": L.write_cache(cache["k_pe"], k_pe, positions[:, 0])}
        w = self.kv_b_proj.variables["params"]["kernel"].reshape(m.kv_lora_rank, H, Dn + m.v_head_dim)
        w_k, w_v = w[..., :Dn], w[..., Dn:]
        q_lat = L.einsum_f32("bthn,rhn->bthr", q_nope, w_k).astype(latent.dtype)   # k_nope absorbed
        scores = (L.einsum_f32("bthr,bsr->bhts", q_lat, new["latent"])
                  + L.einsum_f32("bthd,bsd->bhts", q_pe, new["k_pe"])) * scale
        mask = _self_or_cached_mask(positions, new["latent"].shape[1], None, c.window(self.layer))
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, L.NEG_INF), axis=-1)
        o_lat = L.einsum_f32("bhts,bsr->bthr", probs, new["latent"]).astype(latent.dtype)
        out = L.einsum_f32("bthr,rhv->bthv", o_lat, w_v).astype(x.dtype)              # v absorbed
        return self.o_proj(out.reshape(B, T, -1)), new


def make_attention(cfg: ModelConfig, layer: int):
    return (MLAttention if cfg.attention == "mla" else GQAAttention)(cfg, layer)
