"""Attention of every family as flax.nnx modules over one layer's weights (`weights.py` `_gqa` / `_mla`).

Both share one contract: `module(x, positions, cache=None, kv_valid=None, lean=False)` ->
(out [B, T, d], rows); the sliding window is the module's (static). `rows` are this chunk's new
cache rows ([B, T, ...] per cache entry); the caller owns the cache. With cache=None they attend within the chunk (prefill, the optimise phase;
positions must increase along T, as `positions_for` makes them: causal blocks skip the rest).
With this layer's cache entry ([B, S, ...] buffers) they attend over the buffers with the chunk
written at `positions` (decode). Token t of sequence b always lives in row t, so a sliding-window
layer keeps every row and masks keys older than the window: it stays exact past the window.

  GQAttention  OLMoE, Qwen2/3-MoE, Mixtral, gpt-oss: rows {'k', 'v'} [B, T, K, D]
  MLAttention  DeepSeek-V2/V3: rows {'latent' [B, T, R], 'k_pe' [B, T, Dr]} (the normalised latent and
       the roped key; decode attends in latent space with kv_b absorbed)
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import layers as L
from .config import ModelConfig, RopeConfig
from .nn import arch, declare, stacked, value
from .weights import _gqa, _mla


def linear(x, w, b=None):
    """x [..., n_in] @ w [n_in, n_out] (+ b [n_out])."""
    y = jnp.dot(x, w.astype(x.dtype))
    return y if b is None else y + b.astype(y.dtype)


def split_qkv(qkv, cfg: ModelConfig):
    """The fused projection [..., (H + 2K) * D] (columns q | k | v) -> q [..., H*D], k, v [..., K*D]."""
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return qkv[..., :hq], qkv[..., hq:hq + hk], qkv[..., hq + hk:]


def _mask(positions, cache_rows: Optional[int], kv_valid, window):
    """Mask for attending within the chunk (cache_rows None) or over a cache of `cache_rows` rows."""
    if cache_rows is None:
        return L.attention_mask(positions, positions, kv_valid, window)
    k_pos = jnp.broadcast_to(jnp.arange(cache_rows), (positions.shape[0], cache_rows))
    return L.attention_mask(positions, k_pos, window=window)


def _with_rows(cache, rows, positions):
    """This layer's cache buffers with the chunk's rows written at positions[:, 0]. `cache` is the
    buffers themselves, or a function rows -> buffers (the caller writes into its own storage first,
    so that a layer-stacked cache is updated in place and only then read)."""
    if callable(cache):
        return cache(rows)
    return {n: L.write_cache(cache[n], rows[n], positions[:, 0]) for n in rows}


class GQAttention(nnx.Module):
    """Grouped-query attention with RoPE; one fused q|k|v projection; q/k/v (and o) biases, flat or per-head q/k norm, clip_qkv,
    a sliding window and attention sinks as the config asks. Params: `weights.py` `_gqa`."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None, *, repeats: Optional[int] = None,
                 weights: Optional[dict] = None, rngs: Optional[nnx.Rngs] = None):
        self.cfg, self.window = arch(cfg), window
        declare(self, stacked(_gqa(cfg), repeats), cfg, weights, rngs)

    def __call__(self, x, positions, cache=None, kv_valid=None, lean: bool = False):
        """x [B, T, d]; positions [B, T] -> (out [B, T, d], rows {'k', 'v'} [B, T, K, D])."""
        c, w = self.cfg, functools.partial(value, self)
        B, T, _ = x.shape
        with jax.named_scope("qkv"):
            q, k, v = split_qkv(linear(x, w("qkv_proj"), w("qkv_bias")), c)
            if c.qk_norm == "flat":
                q, k = L.rms_norm(q, w("q_norm"), c.rms_norm_eps), L.rms_norm(k, w("k_norm"), c.rms_norm_eps)
            if c.clip_qkv is not None:
                q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
            q = q.reshape(B, T, c.num_heads, c.head_dim)
            k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
            v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
            if c.qk_norm == "head":
                q, k = L.rms_norm(q, w("q_norm"), c.rms_norm_eps), L.rms_norm(k, w("k_norm"), c.rms_norm_eps)
            cos, sin = L.rope_cos_sin(positions, c.rope, c.rope.dim or c.head_dim)
            q, k = L.apply_rope(q, cos, sin, c.rope.interleaved), L.apply_rope(k, cos, sin, c.rope.interleaved)
        rows = {"k": k, "v": v}
        if cache is not None:
            full = _with_rows(cache, rows, positions)
            k, v = full["k"], full["v"]
        mask = _mask(positions, None if cache is None else k.shape[1], kv_valid, self.window)
        with jax.named_scope("core"):
            out = L.attend(q, k, v, mask, c.head_dim ** -0.5, w("sinks"), causal=cache is None, window=self.window,
                           lean=lean)
        return linear(out.reshape(B, T, -1), w("o_proj"), w("o_bias")), rows


def mla_softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """DeepSeek: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (0.1147 for
    V2-Lite); HF applies the correction only for non-default rope with a truthy mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nnx.Module):
    """DeepSeek multi-head latent attention. Params: `weights.py` `_mla`.

    q = q_proj(x) or q_b(norm(q_a(x))) -> [H, Dn + Dr]; ckv = kv_a(x) = [latent R | rope key Dr];
    c = norm(latent) is expanded per head by kv_b into (k_nope Dn, v Dv); the single rope key is
    shared by all heads. The cache keeps only c and the roped key; decoding attends in latent space
    (kv_b absorbed into q and into the output), which is the same sum re-associated.
    """

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None, *, repeats: Optional[int] = None,
                 weights: Optional[dict] = None, rngs: Optional[nnx.Rngs] = None):
        self.cfg, self.window = arch(cfg), window
        declare(self, stacked(_mla(cfg), repeats), cfg, weights, rngs)

    def project(self, x, positions):
        """-> q_nope [B,T,H,Dn], q_pe [B,T,H,Dr] (roped), latent [B,T,R], k_pe [B,T,Dr] (roped)."""
        c, m, w = self.cfg, self.cfg.mla, functools.partial(value, self)
        B, T, _ = x.shape
        if m.q_lora_rank is None:
            q = linear(x, w("q_proj"))
        else:   # the q_a / kv_a layernorm eps is hard-coded to 1e-6 in HF
            q = linear(L.rms_norm(linear(x, w("q_a_proj"), w("q_a_bias")), w("q_a_norm"), 1e-6), w("q_b_proj"))
        q = q.reshape(B, T, c.num_heads, m.qk_head_dim)
        q_nope, q_pe = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        ckv = linear(x, w("kv_a_proj"), w("kv_a_bias"))
        latent = L.rms_norm(ckv[..., :m.kv_lora_rank], w("kv_a_norm"), 1e-6)
        k_pe = ckv[..., m.kv_lora_rank:][:, :, None, :]
        cos, sin = L.rope_cos_sin(positions, c.rope, m.qk_rope_head_dim)
        q_pe = L.apply_rope(q_pe, cos, sin, c.rope.interleaved)
        k_pe = L.apply_rope(k_pe, cos, sin, c.rope.interleaved)[:, :, 0]
        return q_nope, q_pe, latent, k_pe

    def __call__(self, x, positions, cache=None, kv_valid=None, lean: bool = False):
        """x [B, T, d]; positions [B, T] -> (out [B, T, d], rows {'latent' [B, T, R], 'k_pe' [B, T, Dr]})."""
        c, m, w = self.cfg, self.cfg.mla, functools.partial(value, self)
        window = self.window
        B, T, _ = x.shape
        H, Dn = c.num_heads, m.qk_nope_head_dim
        scale = mla_softmax_scale(c.rope, m.qk_head_dim)
        with jax.named_scope("qkv"):
            q_nope, q_pe, latent, k_pe = self.project(x, positions)
        rows = {"latent": latent, "k_pe": k_pe}
        if cache is None:  # expand the latent per head, exactly as HF does
            kv = linear(latent, w("kv_b_proj")).reshape(B, T, H, Dn + m.v_head_dim)
            k = jnp.concatenate([kv[..., :Dn], jnp.broadcast_to(k_pe[:, :, None], (B, T, H, m.qk_rope_head_dim))],
                                -1)
            q = jnp.concatenate([q_nope, q_pe], -1)
            mask = L.attention_mask(positions, positions, kv_valid, window)
            with jax.named_scope("core"):
                out = L.attend(q, k, kv[..., Dn:], mask, scale, causal=True, window=window, lean=lean)
            return linear(out.reshape(B, T, -1), w("o_proj"), w("o_bias")), rows
        full = _with_rows(cache, rows, positions)
        wkv = w("kv_b_proj").reshape(m.kv_lora_rank, H, Dn + m.v_head_dim)
        w_k, w_v = wkv[..., :Dn], wkv[..., Dn:]
        with jax.named_scope("core"):
            q_lat = L.einsum_f32("bthn,rhn->bthr", q_nope, w_k).astype(latent.dtype)   # k_nope absorbed
            scores = (L.einsum_f32("bthr,bsr->bhts", q_lat, full["latent"])
                      + L.einsum_f32("bthd,bsd->bhts", q_pe, full["k_pe"])) * scale
            mask = _mask(positions, full["latent"].shape[1], None, window)
            probs = jax.nn.softmax(jnp.where(mask[:, None], scores, L.NEG_INF), axis=-1)
            o_lat = L.einsum_f32("bhts,bsr->bthr", probs, full["latent"]).astype(latent.dtype)
            out = L.einsum_f32("bthr,rhv->bthv", o_lat, w_v).astype(x.dtype)              # v absorbed
        return linear(out.reshape(B, T, -1), w("o_proj"), w("o_bias")), rows


def attention_class(cfg: ModelConfig):
    return MLAttention if cfg.attention == "mla" else GQAttention
