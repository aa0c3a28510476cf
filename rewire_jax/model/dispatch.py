"""Routed-expert computation (dispatch): every path is exact (dropless) and gives the same output.

All paths take the routing already decided:
  x [N, d] tokens, weights [N, k] combine weights, idx [N, k] expert ids,
  experts {'gate_up_proj' [E, d, 2I] (gate | up: one matmul, then split), 'down_proj' [E, I, d],
           optional 'gate_up_bias' [E, 2I], 'down_bias' [E, d]}
           (separate 'gate_proj' / 'up_proj' [E, d, I] and 'gate_bias' / 'up_bias' are joined on entry:
           `fused`)
and return [N, d]. `activation` is 'silu' (SwiGLU) or 'gptoss' (clamped SwiGLU, `limit`).

Paths (`method`):
  dense    every expert on every token, sparse combine: E/k x the FLOPs; the reference.
  gather   gather the k chosen experts' weights per token: decode (a handful of tokens).
  blocked  sort the N*k (token, expert) rows by expert, pad each expert's rows to a multiple of a
           block size, run one [block, d] x [d, I] matmul per block that holds rows (a loop over
           experts, each expert's weights read once, and an inner loop over its blocks). Dropless
           with no capacity: the padded layout has a static upper bound N*k + E*(block-1).
           The fast path on CPU.
  ragged   the same sort, then `jax.lax.ragged_dot` (grouped GEMM; XLA lowers it to a dense dot
           over all experts unless a cuDNN fusion applies; on CPU a slow reference).
  kernel   the same sort, then grouped-matmul kernels (`grouped.py`: tokamax's Pallas Mosaic /
           Triton kernels on TPU / GPU, its XLA implementation on CPU; optional extra `accel`).
           Its backward computes the input gradient only: the expert weights are constants.
  auto     gather when N*k <= E; else blocked on CPU; on GPU/TPU dense for small layers (it is
           latency, not FLOPs, that counts there), otherwise kernel where tokamax is installed,
           else ragged (see `choose_method`).
The row permutations of the sorted paths are gathers in both directions (custom VJPs), so the
backward pass has no scatter-add. All paths but `kernel` differentiate w.r.t. x, the combine
weights and the expert weights (the rewiring never asks for the latter; under jit XLA drops that
work); `kernel` w.r.t. x and the combine weights (weight gradients are zero: use another path).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .grouped import grouped_dot, kernel_available, tokamax_available  # noqa: F401 (re-exported)
from .layers import einsum_f32

GPTOSS_ALPHA = 1.702
METHODS = ("dense", "gather", "blocked", "ragged", "kernel")


def glu(h_gate, h_up, activation: str = "silu", limit: Optional[float] = None):
    """Gated activation of one expert's two projections (any leading shape)."""
    if activation == "silu":
        return jax.nn.silu(h_gate) * h_up
    if activation == "gptoss":  # gate clamped above only, up clamped both sides, (up + 1) * glu
        g = jnp.minimum(h_gate, limit)
        u = jnp.clip(h_up, -limit, limit)
        return (u + 1) * g * jax.nn.sigmoid(GPTOSS_ALPHA * g)
    raise ValueError(f"unknown expert activation {activation!r}")


def glu_fused(h, activation: str = "silu", limit: Optional[float] = None):
    """`glu` of the fused projection h [..., 2I] (gate | up)."""
    inter = h.shape[-1] // 2
    return glu(h[..., :inter], h[..., inter:], activation, limit)


SPLIT = (("gate_up_proj", "gate_proj", "up_proj"), ("gate_up_bias", "gate_bias", "up_bias"))


def fused(experts):
    """The expert weights with gate and up fused (`gate_up_proj` [..., E, d, 2I], `gate_up_bias`
    [..., E, 2I]): as they are when already fused (the model's layout, weights.py), else joined here
    (a caller holding separate gate / up weights)."""
    experts = dict(experts)
    for joined, gate, up in SPLIT:
        if gate in experts:
            experts[joined] = jnp.concatenate([experts.pop(gate), experts.pop(up)], -1)
    return experts


def expert_dims(experts) -> tuple[int, int, int]:
    """(E, d, I) of fused or separate expert weights (a leading layer axis allowed)."""
    if "gate_up_proj" in experts:
        E, d, I2 = experts["gate_up_proj"].shape[-3:]
        return E, d, I2 // 2
    return tuple(experts["gate_proj"].shape[-3:])


def _pick(w, layer, e):
    """Expert e's weights [...] from w [E, ...], or from a layer stack w [R, E, ...] at `layer`:
    one dynamic slice of just that expert (slicing the layer first would copy all its experts)."""
    if layer is None:
        return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
    return jax.lax.dynamic_slice(w, (layer, e) + (0,) * (w.ndim - 2), (1, 1) + w.shape[2:])[0, 0]


def layer_view(experts, layer):
    """{name: [E, ...]} of one layer of a stack (a copy of its experts: for the dense / ragged paths)."""
    if layer is None:
        return experts
    return {n: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False) for n, a in experts.items()}


def _bias(experts, name, idx=None):
    b = experts.get(name)
    if b is None:
        return 0.0
    return b if idx is None else b[idx]


def dispatch_dense(x, weights, idx, experts, activation="silu", limit=None, layer=None):
    """Reference path: run every expert on every token, combine with a sparse [N, E] weight matrix.

    E/k times the FLOPs of the sparse paths; the ground truth in tests, and fine for tiny E.
    """
    experts = layer_view(fused(experts), layer)
    E = experts["gate_up_proj"].shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * weights[..., None].astype(jnp.float32), axis=1)
    h = glu_fused(jnp.einsum("nd,edi->nei", x, experts["gate_up_proj"]) + _bias(experts, "gate_up_bias"),
                  activation, limit)
    out = einsum_f32("nei,eid->ned", h, experts["down_proj"]) + _bias(experts, "down_bias")
    return jnp.einsum("ned,ne->nd", out, combine).astype(x.dtype)


def dispatch_gather(x, weights, idx, experts, activation="silu", limit=None, layer=None):
    """Decode path: one (token, expert) row at a time, reading that expert's weights in place.

    A loop over the N*k rows with a dynamic index into the stacked weights: ~2x faster on CPU than
    gathering [N, k, d, I] weight copies (which XLA materialises in a transposed layout).
    """
    N, d = x.shape
    k = idx.shape[1]
    experts = fused(experts)
    bgu, bd = experts.get("gate_up_bias"), experts.get("down_bias")
    take = lambda w, e: _pick(w, layer, e)

    def row(args):
        xr, e = args
        h = _dot(xr, take(experts["gate_up_proj"], e))
        if bgu is not None:
            h = h + take(bgu, e)
        y = _dot(glu_fused(h, activation, limit), take(experts["down_proj"], e))
        return y + take(bd, e) if bd is not None else y

    rows = jnp.repeat(x, k, axis=0)[:, None]                        # [N*k, 1, d]
    y = jax.lax.map(row, (rows, idx.reshape(N * k)))[:, 0]          # [N*k, d]
    return jnp.einsum("nkd,nk->nd", y.reshape(N, k, d).astype(jnp.float32),
                      weights.astype(jnp.float32)).astype(x.dtype)


# -- sorted (grouped) paths --------------------------------------------------------------------

class Plan(NamedTuple):
    """Where each (token, slot) row goes in the expert-sorted, block-padded layout of P rows.

    dest [N, k]: padded row of assignment (n, j); src [P]: assignment index n*k+j of each padded
    row (N*k for padding rows); counts [E]; expert e owns blocks [first_block[e], first_block[e] +
    num_blocks[e]) of the padded layout.
    """
    dest: jax.Array
    src: jax.Array
    counts: jax.Array
    first_block: jax.Array
    num_blocks: jax.Array


def _idiv(a, n: int):
    """a // n for non-negative int32 `a` and a static n > 0: one truncating division (equal to the
    floor there), where jnp's floor_divide adds sign fix-ups, ~10 HLO ops per use in every layer."""
    return jax.lax.div(a, jnp.asarray(n, a.dtype))


def padded_rows(n_rows: int, num_experts: int, block: int) -> int:
    """Static upper bound of the padded layout: every expert's rows rounded up to a whole block."""
    return -(-(n_rows + num_experts * (block - 1)) // block) * block


def make_plan(idx, num_experts: int, block: int = 1) -> Plan:
    """Sort the N*k assignments by expert (stable: token order within an expert) and pad each
    expert's group to a multiple of `block` rows (block=1: plain sort, P = N*k)."""
    N, k = idx.shape
    R = N * k
    flat = idx.reshape(R).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)       # sorted row -> assignment
    counts = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    padded = _idiv(counts + block - 1, block) * block
    pend = jnp.cumsum(padded)
    pstart = pend - padded
    start = jnp.cumsum(counts) - counts
    e_sorted = flat[order]
    dest_sorted = pstart[e_sorted] + jnp.arange(R, dtype=jnp.int32) - start[e_sorted]
    dest = jnp.zeros(R, jnp.int32).at[order].set(dest_sorted)
    P = padded_rows(R, num_experts, block) if block > 1 else R
    src = jnp.full(P, R, jnp.int32).at[dest].set(jnp.arange(R, dtype=jnp.int32))
    return Plan(dest.reshape(N, k), src, counts, _idiv(pstart, block), _idiv(padded, block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _expand(x, src, dest, k: int):
    """x [N, d] -> rows [P, d]: row p is x[src[p] // k] (zeros for padding rows)."""
    return jnp.take(x, _idiv(src, k), axis=0, mode="fill", fill_value=0)


def _expand_fwd(x, src, dest, k):
    return _expand(x, src, dest, k), (src, dest)


def _expand_bwd(k, res, g):
    src, dest = res
    # every token appears in exactly k rows: the transpose of the row gather is a gather + sum
    return jnp.sum(jnp.take(g, dest, axis=0), axis=1), None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def _combine(y, w, dest, src):
    """y [P, d] expert outputs, w [N, k] -> out [N, d] = sum_j w[n, j] * y[dest[n, j]] (fp32)."""
    return jnp.einsum("nkd,nk->nd", jnp.take(y, dest, axis=0).astype(jnp.float32), w.astype(jnp.float32))


def _combine_fwd(y, w, dest, src):
    return _combine(y, w, dest, src), (y, w, dest, src)


def _combine_bwd(res, g):
    y, w, dest, src = res
    N, k = w.shape
    wf = jnp.take(w.reshape(N * k), src, mode="fill", fill_value=0).astype(jnp.float32)   # 0 on padding
    gy = (jnp.take(g, _idiv(src, k), axis=0, mode="fill", fill_value=0) * wf[:, None]).astype(y.dtype)
    gw = jnp.einsum("nkd,nd->nk", jnp.take(y, dest, axis=0).astype(jnp.float32), g).astype(w.dtype)
    return gy, gw, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _dot(a, b):
    """a [..., m] x b [m, n] with fp32 accumulation, result in a's dtype (bf16 stays bf16).
    (bf16 x bf16 -> fp32 is a native dot on XLA:CPU too: 2x the fp32 rate on AVX512-BF16.)"""
    return jnp.einsum("...m,mn->...n", a, b.astype(a.dtype), preferred_element_type=jnp.float32).astype(a.dtype)


def _dot_t(a, b):
    """a [..., n] x b[m, n]^T (no transposed copy of b)."""
    return jnp.einsum("...n,mn->...m", a, b.astype(a.dtype), preferred_element_type=jnp.float32).astype(a.dtype)


def choose_block(n_rows: int, num_experts: int) -> int:
    """Rows per block of the blocked path, from the mean rows per expert.

    Padding costs ~block/2 rows per expert; bigger blocks make faster matmuls. Measured on a 2-core
    CPU (d 512, I 256, 32 experts, forward + backward): 32 is best from 32 to 80 mean rows per
    expert (16 is 25% slower there, 64 up to 40% slower).
    Few rows per expert (decode of a batch: N*k rows over E experts, a handful each) take small
    blocks: measured (same CPU, forward only, OLMoE-shaped layer at 16 / 64 tokens of decode, 2 /
    8 rows per expert) block 4 / 8 is 1.4x / 1.1x faster than 16, whose padding is mostly zeros.
    """
    mean = n_rows // max(num_experts, 1)
    if mean <= 8:
        return 4 if mean <= 4 else 8
    return 16 if mean < 16 else 32 if mean < 256 else 64


def _expert_loop(plan: Plan, experts, body, carry, layer=None):
    """for e in the experts that hold rows: w = that expert's weights (sliced once); for each of its
    blocks: body.

    body(e, w, block index b, carry) -> carry. Loops with run-time trip counts: only the experts hit
    and the blocks that hold rows are computed (this is why the grouped matmul has a custom VJP).
    Weight traffic therefore grows with the number of distinct experts hit, not with E (a decode
    step of a few rows slices only its experts' weights) nor with rows x top-k."""
    E = plan.num_blocks.shape[0]
    hit = plan.num_blocks > 0
    # the hit experts first, in expert order (a stable sort of the misses to the end)
    order = jnp.argsort(~hit, stable=True).astype(jnp.int32)
    n_hit = jnp.sum(hit.astype(jnp.int32))

    def per_expert(i, carry):
        e = order[i]
        w = {n: _pick(a, layer, e) for n, a in experts.items()}
        b0 = plan.first_block[e]
        return jax.lax.fori_loop(0, plan.num_blocks[e], lambda j, c: body(e, w, b0 + j, c), carry)
    return jax.lax.fori_loop(0, jnp.minimum(n_hit, E), per_expert, carry)


def _rows_at(a, b, block):
    return jax.lax.dynamic_slice_in_dim(a, b * block, block, axis=0)


def _put_rows(a, v, b, block):
    return jax.lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), b * block, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked_ffn(block: int, activation: str, limit, rows, plan, experts, layer):
    """Expert FFN on the expert-sorted, block-padded rows [P, d] (padding rows give zeros).
    experts: [E, ...] leaves, or [R, E, ...] layer stacks read at `layer` (None: not stacked)."""
    return _blocked_ffn_fwd(block, activation, limit, rows, plan, experts, layer)[0]


def _blocked_ffn_fwd(block, activation, limit, rows, plan, experts, layer):
    P, d = rows.shape
    I2 = experts["gate_up_proj"].shape[-1]

    def body(e, w, b, carry):
        y, h_all = carry
        xb = _rows_at(rows, b, block)
        h = _dot(xb, w["gate_up_proj"])
        if "gate_up_bias" in w:
            h = h + w["gate_up_bias"]
        yb = _dot(glu_fused(h, activation, limit), w["down_proj"])
        if "down_bias" in w:
            yb = yb + w["down_bias"]
        return _put_rows(y, yb, b, block), _put_rows(h_all, h, b, block)

    zeros = lambda n: jnp.zeros((P, n), rows.dtype)
    y, h = _expert_loop(plan, experts, body, (zeros(d), zeros(I2)), layer)
    return y, (rows, plan, experts, layer, h)


def _blocked_ffn_bwd(block, activation, limit, res, gy):
    rows, plan, experts, layer, h_all = res
    P, d = rows.shape

    def block_grads(w, b):
        g = _rows_at(gy, b, block)
        a, pull = jax.vjp(lambda h: glu_fused(h, activation, limit), _rows_at(h_all, b, block))
        dh, = pull(_dot_t(g, w["down_proj"]))
        return g, a, dh

    # activations: dx = dh W_gate_up^T (dh = [dgate | dup])
    def body_dx(e, w, b, dx):
        _, _, dh = block_grads(w, b)
        return _put_rows(dx, _dot_t(dh, w["gate_up_proj"]), b, block)

    dx = _expert_loop(plan, experts, body_dx, jnp.zeros((P, d), rows.dtype), layer)

    # expert weights: a separate loop, so that XLA drops it when nobody asks for weight gradients
    def body_dw(e, w, b, acc):
        g, h, dh = block_grads(w, b)
        x = _rows_at(rows, b, block)
        upd = {"gate_up_proj": einsum_f32("bd,bi->di", x, dh), "down_proj": einsum_f32("bi,bd->id", h, g),
               "gate_up_bias": jnp.sum(dh.astype(jnp.float32), 0), "down_bias": jnp.sum(g.astype(jnp.float32), 0)}
        at = e if layer is None else (layer, e)
        return {n: a.at[at].add(upd[n]) for n, a in acc.items()}

    dW = _expert_loop(plan, experts, body_dw, {n: jnp.zeros(w.shape, jnp.float32) for n, w in experts.items()},
                      layer)
    dW = {n: dW[n].astype(experts[n].dtype) for n in experts}
    return dx, None, dW, None


_blocked_ffn.defvjp(_blocked_ffn_fwd, _blocked_ffn_bwd)


def dispatch_blocked(x, weights, idx, experts, activation="silu", limit=None, layer=None,
                     block: Optional[int] = None):
    """Sorted + block-padded grouped matmuls, one loop step per block (unused blocks skipped)."""
    N, d = x.shape
    k = idx.shape[1]
    experts = fused(experts)
    E = experts["gate_up_proj"].shape[0 if layer is None else 1]
    block = block or choose_block(N * k, E)
    plan = make_plan(idx, E, block)
    rows = _expand(x, plan.src, plan.dest, k)
    y = _blocked_ffn(block, activation, limit, rows, plan, experts, layer)
    return _combine(y, weights, plan.dest, plan.src).astype(x.dtype)


def dispatch_ragged(x, weights, idx, experts, activation="silu", limit=None, layer=None,
                    impl: Optional[str] = None):
    """Sorted rows + grouped GEMMs: jax.lax.ragged_dot, or the kernels of `grouped_matmul(impl)`."""
    experts = layer_view(fused(experts), layer)
    N, d = x.shape
    k = idx.shape[1]
    E = experts["gate_up_proj"].shape[0]
    plan = make_plan(idx, E, 1)
    rows = _expand(x, plan.src, plan.dest, k)
    rd = grouped_dot(plan.counts, impl)
    h = rd(rows, experts["gate_up_proj"])
    if "gate_up_bias" in experts:
        h = h + experts["gate_up_bias"][jnp.take(idx.reshape(-1), plan.src)]   # P == N*k: no padding rows
    y = rd(glu_fused(h, activation, limit), experts["down_proj"])
    if "down_bias" in experts:
        y = y + experts["down_bias"][jnp.take(idx.reshape(-1), plan.src)]
    return _combine(y, weights, plan.dest, plan.src).astype(x.dtype)


def dispatch_kernel(x, weights, idx, experts, activation="silu", limit=None, layer=None):
    """Sorted rows + tokamax's grouped-matmul kernels (GPU/TPU); input gradient only (the expert
    weights, biases included, are constants)."""
    experts = jax.lax.stop_gradient(dict(experts))
    return dispatch_ragged(x, weights, idx, experts, activation, limit, layer, impl="tokamax")


DISPATCH = {"dense": dispatch_dense, "gather": dispatch_gather, "blocked": dispatch_blocked,
            "ragged": dispatch_ragged, "kernel": dispatch_kernel}


#: GPU/TPU: below this many dense-path FLOPs (forward, all experts on all tokens) the dense path
#: beats ragged_dot, whose grouped GEMMs are latency-bound at small sizes. Measured on an H100
#: (d 512, I 256, 32 experts top-4, forward + backward): dense 0.65 / 1.76 ms vs ragged 1.22 / 4.06 ms
#: at 1024 / 4096 tokens, i.e. up to ~1e11 dense FLOPs; a real-size model (OLMoE-1B-7B: 4e11 at 512
#: tokens) is past it.
DENSE_FLOPS_ACCEL = 1.5e11


def choose_method(n_tokens: int, k: int, num_experts: int, backend: Optional[str] = None,
                  hidden: int = 0, inter: int = 0, kernel: Optional[bool] = None) -> str:
    """The automatic choice: gather for a handful of tokens (decode); on CPU the blocked grouped
    matmuls; on GPU/TPU dense while it is cheap, else the grouped-matmul kernels (`kernel`: None =
    `kernel_available(backend)`), else ragged_dot. Override per model (`ModelConfig.dispatch`,
    `load(..., dispatch=...)`, CLI `--dispatch`) or per call (`dispatch=` of `forward` / `prefill` /
    `decode` / `optimise_phase`): both are static, so jit caches see them."""
    if n_tokens * k <= num_experts:
        return "gather"
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "blocked"
    if 6.0 * n_tokens * num_experts * hidden * inter <= DENSE_FLOPS_ACCEL:
        return "dense"
    return "kernel" if (kernel_available(backend) if kernel is None else kernel) else "ragged"


def dispatch(x, weights, idx, experts, method: str = "auto", activation: str = "silu",
             limit: Optional[float] = None, layer=None):
    """Run the routed experts with the chosen path (all paths give the same output).

    experts: {name: [E, ...]}, or the layer stacks {name: [R, E, ...]} read at `layer` (inside the
    scan over layers: each path slices just the experts it uses, never a copy of the whole layer)."""
    if method == "auto":
        E, d, I = expert_dims(experts)
        method = choose_method(x.shape[0], idx.shape[1], E, hidden=d, inter=I)
    if method not in DISPATCH:
        raise ValueError(f"unknown MoE dispatch {method!r}; choose from auto, {', '.join(DISPATCH)}")
    return DISPATCH[method](x, weights, idx, experts, activation, limit, layer)
