"""Expert-parallel MoE under a device mesh: the routed experts in `jax.shard_map`.

Layout inside the shard_map (mesh axes of `model/sharding.py`):
  tokens x [B, T, d], combine weights and expert ids [B, T, k]: sharded on the batch axes
      (data, fsdp: whatever divides B), replicated over expert and tensor;
  experts gate_up_proj [E, d, 2I], down_proj [E, I, d] (+ biases): E on `expert`, I on `tensor`
      (a leading stacked-layer axis, when the scan over layers passes the stack, is unsharded).
      The fused gate | up is viewed as [E, d, 2, I] at the boundary, so that each tensor shard
      holds the same slice of I of both halves (its local gate_up_proj [E/n, d, 2I/n] is again
      gate | up).
Each shard runs only its own E/n_expert experts on the slice I/n_tensor of their width, with the
grouped path of its backend (`dispatch.py`: blocked on CPU, the grouped-matmul kernels or
ragged_dot on GPU/TPU, gather for a handful of tokens, dense), on the (token, expert) rows routed
to them: the other rows are sorted into a bucket that is never computed. The partial outputs
(fp32) are summed over expert x tensor with one `psum`; SwiGLU is elementwise in the width, so
the split is exact up to summation order.
Differentiable (the optimise phase's backward runs through the same shard_map).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import dispatch as D
from .sharding import batch_axes


#: fused weights whose last axis (gate | up) is viewed as [2, I] across the shard_map boundary
HALVED = ("gate_up_proj", "gate_up_bias")


def _halve(a):
    """[..., 2I] -> [..., 2, I]: gate and up as rows, so that I can be split over `tensor`."""
    return a.reshape(a.shape[:-1] + (2, a.shape[-1] // 2))


def _unhalve(a):
    """[..., 2, I'] -> [..., 2I'] (gate | up of this shard's slice of the width)."""
    return a.reshape(a.shape[:-2] + (2 * a.shape[-1],))


def _local_sorted(x, w, li, valid, experts, n_local, method, activation, limit, layer):
    """The local experts' share on sorted rows. li [N, k] local expert ids (garbage where not
    valid); rows not valid go to bucket `n_local`, never computed. -> [N, d] fp32."""
    N, d = x.shape
    k = li.shape[1]
    e = jnp.where(valid, li, n_local).astype(jnp.int32)
    if method == "blocked":
        block = D.choose_block(N * k * n_local // max(1, n_local + 1), n_local)
        plan = D.make_plan(e, n_local + 1, block)
        plan = plan._replace(num_blocks=plan.num_blocks.at[n_local].set(0))
        rows = D._expand(x, plan.src, plan.dest, k)
        y = D._blocked_ffn(block, activation, limit, rows, plan, dict(experts), layer)
        return D._combine(y, w, plan.dest, plan.src)
    # ragged / kernel: group sizes of the local experts only; the bucket's rows (at the end) give zeros
    ex = D.layer_view(experts, layer)
    if method == "kernel":
        ex = jax.lax.stop_gradient(ex)
    plan = D.make_plan(e, n_local + 1, 1)
    rows = D._expand(x, plan.src, plan.dest, k)
    counts = plan.counts[:n_local]
    e_row = jnp.take(e.reshape(-1), plan.src)
    keep = (e_row < n_local)[:, None]
    e_row = jnp.minimum(e_row, n_local - 1)
    rd = D.grouped_dot(counts, "tokamax" if method == "kernel" else None)   # bucket rows: zeros
    h = rd(rows, ex["gate_up_proj"])
    if "gate_up_bias" in ex:
        h = h + ex["gate_up_bias"][e_row]
    y = rd(D.glu_fused(h, activation, limit), ex["down_proj"])
    if "down_bias" in ex:
        y = y + ex["down_bias"][e_row]
    y = jnp.where(keep, y, 0)
    return D._combine(y, w, plan.dest, plan.src)


def _local(x, w, idx, experts, layer, *, num_experts, n_expert, method, activation, limit, ex_axis, t_axis):
    B, T, d = x.shape
    k = idx.shape[-1]
    experts = {n: _unhalve(a) if n in HALVED else a for n, a in experts.items()}
    n_local = num_experts // n_expert if ex_axis else num_experts
    e0 = jax.lax.axis_index(ex_axis) * n_local if ex_axis else 0
    if t_axis and "down_bias" in experts:   # added once over the width split
        experts = {**experts, "down_bias": experts["down_bias"] * (jax.lax.axis_index(t_axis) == 0).astype(
            experts["down_bias"].dtype)}
    xf, wf = x.reshape(B * T, d), w.reshape(B * T, k)
    li = idx.reshape(B * T, k) - e0
    valid = (li >= 0) & (li < n_local)
    wf = jnp.where(valid, wf, jnp.zeros_like(wf))
    m = method
    if m == "auto":
        inter = experts["gate_up_proj"].shape[-1] // 2
        m = D.choose_method(B * T, k, n_local, hidden=d, inter=inter)
    if m in ("blocked", "ragged", "kernel"):
        y = _local_sorted(xf, wf, li, valid, experts, n_local, m, activation, limit, layer)
    else:   # dense / gather: every local expert id valid, the others weigh 0
        lic = jnp.clip(li, 0, n_local - 1)
        y = D.DISPATCH[m](xf, wf, lic, experts, activation, limit, layer).astype(jnp.float32)
    axes = tuple(a for a in (ex_axis, t_axis) if a)
    if axes:
        y = jax.lax.psum(y, axes)
    return y.astype(x.dtype).reshape(B, T, d)


def moe_dispatch(x, weights, idx, experts, cfg, method: str, layer=None):
    """Routed experts under `cfg.mesh`. x [B, T, d]; weights [B, T, k] (model dtype); idx [B, T, k];
    experts {name: [E, ...]} or stacked {name: [R, E, ...]} read at `layer`. -> [B, T, d]."""
    mesh = cfg.mesh
    E = cfg.num_experts
    experts = D.fused(experts)
    I = experts["gate_up_proj"].shape[-1] // 2
    n_e, n_t = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    ex_axis = "expert" if n_e > 1 and E % n_e == 0 else None
    t_axis = "tensor" if n_t > 1 and I % n_t == 0 else None
    if method not in ("auto",) + D.METHODS:
        raise ValueError(f"unknown MoE dispatch {method!r}; choose from auto, {', '.join(D.METHODS)}")
    lead = () if layer is None else (None,)
    specs = {"gate_up_proj": P(*lead, ex_axis, None, None, t_axis), "down_proj": P(*lead, ex_axis, t_axis, None),
             "gate_up_bias": P(*lead, ex_axis, None, t_axis), "down_bias": P(*lead, ex_axis, None)}
    experts = {n: _halve(a) if n in HALVED else a for n, a in experts.items()}
    bspec = P(batch_axes(x.shape[0], mesh))
    layer_arg = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)

    def local(x, w, idx, ex, lay):
        return _local(x, w, idx, ex, None if layer is None else lay, num_experts=E, n_expert=n_e, method=method,
                      activation=cfg.expert_activation, limit=cfg.swiglu_limit, ex_axis=ex_axis, t_axis=t_axis)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(bspec, bspec, bspec, {n: specs[n] for n in experts}, P()),
                       out_specs=bspec, check_vma=False)
    return fn(x, weights, idx, experts, layer_arg)
