"""Pure numerical building blocks shared by every family: norms, RoPE, attention, SwiGLU.

Shapes: B batch, T query tokens, S key tokens, H query heads, K kv heads, D head dim,
E routed experts, k experts per token, d model width.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import rope_table
from .config import RopeConfig

NEG_INF = -1e30  # finite, so fully-masked rows never produce NaN


def einsum_f32(spec: str, a, b):
    """einsum with fp32 accumulation/output. XLA:CPU has no bf16 x bf16 -> f32 dot, so upcast there."""
    if jax.default_backend() == "cpu" and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def rms_norm(x, weight, eps: float):
    """Llama-style RMSNorm: statistics in fp32, cast back to x.dtype *before* the weight."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


# -- RoPE --------------------------------------------------------------------------------------

def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _pos_freqs(theta: float, dim: int) -> np.ndarray:
    """theta ** (2i / dim) in fp32, bit-identical to transformers when torch is installed.

    numpy's and torch's fp32 pow differ by 1-2 ulp in a few entries, which at long context shifts
    rope angles by ~1e-3; so reproduce torch's own op when it is there (it only runs at trace time;
    `rope_table` can keep its result on disk), else take the pow in fp64 and round once.
    """
    table = rope_table.pos_freqs(theta, dim)
    if table is not None:
        return table
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)


_rope_lock = threading.Lock()


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2] float32, attention_factor) exactly as transformers computes them (fp32).

    One array object per (rope, dim), whichever thread asks first: JAX makes the layers' uses of a
    numpy constant one program constant only when they are the same object, so two threads computing
    it at once (the CLI traces on two) gave a program that differs from run to run, and a warm run
    then missed the persistent compile cache."""
    with _rope_lock:
        return _rope_inv_freq(rope, dim)


@functools.lru_cache(maxsize=64)
def _rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    pos_freqs = _pos_freqs(float(rope.theta), dim)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    # YaRN (HF _compute_yarn_parameters)
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_get_mscale(factor, rope.mscale) / _yarn_get_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_get_mscale(factor)
    orig = rope.original_max_position_embeddings

    def corr_dim(n_rot):
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1) - ramp).astype(np.float32)
    interp = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    extra = np.float32(1.0) / pos_freqs
    inv_freq = (interp * (1 - extrapolation) + extra * extrapolation).astype(np.float32)
    return inv_freq, attention_factor


def rope_cos_sin(positions, rope: RopeConfig, dim: int):
    """positions [B, T] int -> (cos, sin) [B, T, dim/2] float32, attention factor folded in."""
    inv_freq, attn_factor = rope_inv_freq(rope, dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x, cos, sin, interleaved: bool = False):
    """x [B, T, N, dim]; cos/sin [B, T, dim/2]. Rotate-half (NeoX) or interleaved pairs."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# -- attention ---------------------------------------------------------------------------------

def attention_mask(q_pos, k_pos, k_valid=None, window: Optional[int] = None):
    """Boolean [B, T, S]: key j visible to query i iff k_pos <= q_pos (and inside the window)."""
    visible = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if k_valid is not None:
        visible &= k_valid[:, None, :]
    return visible


#: Query rows per block of causal self-attention (see `attend`); at most ATTN_MAX_BLOCKS blocks.
ATTN_BLOCK = 128
ATTN_MAX_BLOCKS = 8


def attend(q, k, v, mask, scale: float, sinks=None, causal: bool = False, window: Optional[int] = None,
           lean: bool = False):
    """Grouped-query attention.

    q [B, T, H, D]; k [B, S, K, D]; v [B, S, K, Dv]; mask [B, T, S] bool; sinks [H] or None
    (gpt-oss: one extra learned logit per head in the softmax denominator). -> [B, T, H, Dv]

    causal=True is the caller's promise that the keys are the queries' own sequence with strictly
    increasing integer positions (self-attention: mask[b, i, j] is False for j > i, and for
    i - j >= window). The queries then run in blocks, each against only the keys it can see: the
    masked upper triangle (and the keys left of a sliding window) are skipped, not computed and
    masked. Same result; about half the work at long context.

    lean=True (under per-layer rematerialisation): the backward recomputes the attention
    probabilities from q, k instead of keeping them from the forward (memory linear in the context
    per block instead of [T, S] per head kept for the whole layer; same values).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    if not causal and T == 1 and sinks is None and K <= DECODE_BLOCKDIAG_MAX_KV:
        return _decode_attend(q, k, v, mask, scale)
    qt = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)              # [B, K, G, T, D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, K, S, D]
    bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)          # [B, T, S]
    sink = None if sinks is None else sinks.astype(jnp.float32).reshape(K, G)
    n_blocks = min(ATTN_MAX_BLOCKS, T // ATTN_BLOCK) if causal and T == S else 1
    core = _attention_core_lean if lean else _attention_core
    if lean and T > ATTN_LEAN_BLOCK:
        out = _attend_sequential(qt, kt, vt, mask, sink, scale)
    elif n_blocks <= 1:
        out = core(qt, kt, vt, bias, sink, scale)
    else:
        edges = [0] + [-(-T * i // n_blocks // 16) * 16 for i in range(1, n_blocks)] + [T]
        outs = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            k_lo = 0 if window is None else max(0, (lo - window + 1) // 16 * 16)
            outs.append(core(qt[:, :, :, lo:hi], kt[:, :, k_lo:hi], vt[:, :, k_lo:hi],
                                        bias[:, lo:hi, k_lo:hi], sink, scale))
        out = jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, v.shape[-1])


#: Decode (one query per sequence against the cache) with at most this many KV heads attends
#: through a block-diagonal query (`_decode_attend`).
DECODE_BLOCKDIAG_MAX_KV = 8


def _decode_attend(q, k, v, mask, scale):
    """One query per sequence against a [B, S, K, D] cache without transposing the cache.

    The general path transposes K and V to [B, K, S, D] for its batched matmuls: on XLA:CPU a full
    copy of the cache window per layer per token, which made a batch-16 decode step cost ~16x a
    batch-1 step on the demo model. Here the query is laid out block-diagonally, [B, H, K*D] with
    head h's D values at its KV group's columns and zeros elsewhere, so the scores are one matmul
    against the cache as stored ([B, S, K*D]), and the output one matmul of the probabilities with
    [B, S, K*Dv] from which each head keeps its group's block: K times the (tiny) FLOPs, no copy.
    Same sums (the zeros add exactly nothing); measured bit-identical to the general path."""
    B, _, H, D = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // K
    eye = jnp.eye(K, dtype=q.dtype)
    qbd = q.reshape(B, K, G, 1, D) * eye[None, :, None, :, None]                   # [B, K, G, K', D]
    s = einsum_f32("bhc,bsc->bhs", qbd.reshape(B, H, K * D), k.reshape(B, S, K * D)) * scale
    s = s + jnp.where(mask[:, 0], 0.0, NEG_INF).astype(jnp.float32)[:, None, :]
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhs,bsc->bhc", p.astype(v.dtype), v.reshape(B, S, K * Dv)).reshape(B, K, G, K, Dv)
    o = jnp.einsum("bkgcd,kc->bkgd", o, eye.astype(o.dtype))
    return o.reshape(B, 1, H, Dv)


#: Query rows per step of the sequential (lean) attention loop.
ATTN_LEAN_BLOCK = 256


def _attend_sequential(qt, kt, vt, mask, sink, scale):
    """Query blocks of ATTN_LEAN_BLOCK rows in a loop (lax.map), each against all keys with its
    slice of the boolean mask: at most one block's [rows, S] scores live at a time, forward and
    backward (the lean VJP recomputes them), so memory is linear in the context. Masked keys are
    computed (no causal skip): ~2x the attention FLOPs of the blocked path, for long contexts."""
    B, K, G, T, D = qt.shape
    S = kt.shape[2]
    blk = ATTN_LEAN_BLOCK
    nb = -(-T // blk)
    pad = nb * blk - T
    qp = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    mp = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qb = qp.reshape(B, K, G, nb, blk, D).transpose(3, 0, 1, 2, 4, 5)        # [nb, B, K, G, blk, D]
    mb = mp.reshape(B, nb, blk, S).transpose(1, 0, 2, 3)                    # [nb, B, blk, S]

    def one(args):
        q, m = args
        return _attention_core_lean(q, kt, vt, jnp.where(m, 0.0, NEG_INF).astype(jnp.float32), sink, scale)
    out = jax.lax.map(one, (qb, mb))                                        # [nb, B, K, G, blk, Dv]
    return out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, nb * blk, -1)[:, :, :, :T]


def _softmax_parts(q, k, bias, sink, scale):
    """Scores -> (probabilities [B, K, G, T, S] fp32, sink probability [B, K, G, T] or None)."""
    s = einsum_f32("bkgtd,bksd->bkgts", q, k) * scale + bias[:, None, None]
    m = jnp.max(s, axis=-1)
    if sink is not None:
        m = jnp.maximum(m, sink[None, :, :, None])
    e = jnp.exp(s - m[..., None])
    total = jnp.sum(e, axis=-1)
    p_sink = None
    if sink is not None:
        e_sink = jnp.exp(sink[None, :, :, None] - m)
        total = total + e_sink
        p_sink = e_sink / total
    return e / total[..., None], p_sink


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q, k, v, bias, sink, scale):
    """softmax(q k^T * scale + bias [, sink]) v.  q [B, K, G, T, D]; k [B, K, S, D]; v [B, K, S, Dv];
    bias [B, T, S] fp32; sink [K, G] fp32 or None -> [B, K, G, T, Dv].

    A hand-written VJP (the flash-attention backward: dS = P * (dP - rowsum(dO * O))): fewer passes
    over the [T, S] matrices than autodiff of the softmax, which is what attention time is on CPU."""
    p, _ = _softmax_parts(q, k, bias, sink, scale)
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)


def _attention_core_fwd(q, k, v, bias, sink, scale):
    p, p_sink = _softmax_parts(q, k, bias, sink, scale)
    o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)
    return o, (q, k, v, p, p_sink, o)


def _attention_core_bwd(scale, res, do):
    q, k, v, p, p_sink, o = res
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(v.dtype), do)
    dp = einsum_f32("bkgtd,bksd->bkgts", do, v)
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)   # [B, K, G, T]
    ds = p * (dp - di[..., None]) * scale
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds.astype(q.dtype), k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds.astype(q.dtype), q)
    dsink = None if p_sink is None else -jnp.sum(p_sink * di, axis=(0, 3))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, dsink


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core_lean(q, k, v, bias, sink, scale):
    """_attention_core whose backward recomputes the probabilities (keeps q, k, v, o, not p)."""
    return _attention_core(q, k, v, bias, sink, scale)


def _attention_core_lean_fwd(q, k, v, bias, sink, scale):
    o = _attention_core(q, k, v, bias, sink, scale)
    return o, (q, k, v, bias, sink, o)


def _attention_core_lean_bwd(scale, res, do):
    q, k, v, bias, sink, o = res
    p, p_sink = _softmax_parts(q, k, bias, sink, scale)
    return _attention_core_bwd(scale, (q, k, v, p, p_sink, o), do)


_attention_core_lean.defvjp(_attention_core_lean_fwd, _attention_core_lean_bwd)


def write_cache(cache, new, start):
    """cache [B, S, ...]; new [B, T, ...]; start [B] int -> cache with new at rows start[b]:."""
    def one(c, n, s):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)
    return jax.vmap(one)(cache, new, start)


# -- feed-forward and routing ----------------------------------------------------------------

def swiglu(x, w_gate_up, w_down):
    """Dense SwiGLU: x [..., d]; w_gate_up [d, 2I] (gate | up: one matmul); w_down [I, d]."""
    h = x @ w_gate_up
    inter = w_down.shape[0]
    return (jax.nn.silu(h[..., :inter]) * h[..., inter:]) @ w_down
