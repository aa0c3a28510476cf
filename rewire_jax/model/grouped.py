"""Grouped matmul of the routed experts: rows sorted by expert times that expert's weight.

  grouped_matmul(x [M, K], w [E, K, N], group_sizes [E], impl) -> [M, N] in x's dtype

Rows [sum(group_sizes[:e]), sum(group_sizes[:e+1])) are multiplied by w[e] with fp32
accumulation; rows past sum(group_sizes) give zeros (jax.lax.ragged_dot's contract, enforced here
for every impl, so that a caller may leave rows out, e.g. the rows of other expert shards).

impl:
  'xla'      jax.lax.ragged_dot (XLA's own lowering: a dense dot over all groups where the backend
             has no grouped kernel, e.g. CPU and GPU outside cuDNN's fusions).
  'tokamax'  tokamax.ragged_dot (optional extra: pip install 'rewire-jax[accel]'): Pallas Mosaic
             kernels on TPU and Hopper/Blackwell GPUs, Triton on other GPUs, its XLA implementation
             elsewhere (CPU); tokamax picks the first that supports the device, shapes and dtypes.

Differentiable in x only. The backward is dx [M, K] = dy [M, N] . w[e]^T per group, with the same
kernel (a ragged dot contracting w's last axis); no weight gradient is ever computed: w is a
constant (stop_gradient), as the rewiring differentiates only the routing deltas. It is a function
of one weight, so a fused gate/up weight [E, d, 2I] is one call.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import jax
import jax.numpy as jnp

IMPLS = ("xla", "tokamax")

# dx = dy . w^T: contract dy's axis 1 with w's axis 2, w's group axis 0, rows of dy ragged (the
# layout tokamax's TPU kernel runs natively; its GPU kernels transpose one layer's weight first)
_DX_DIMS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def tokamax_available() -> bool:
    """Whether the optional tokamax package is installed (without importing it: ~2 s)."""
    return importlib.util.find_spec("tokamax") is not None


def _tokamax():
    try:
        import tokamax
        from absl import flags
    except ImportError as e:   # pragma: no cover - exercised only without the extra
        raise ImportError("the grouped-matmul kernel path needs tokamax: pip install 'rewire-jax[accel]' "
                          "(or choose dispatch 'ragged' / 'blocked')") from e
    # tokamax reads its options as absl flags and, if nobody parsed them, parses sys.argv itself,
    # which fails on any other program's arguments (pytest's, the CLI's): use the defaults instead.
    # An absl program has parsed its flags before it gets here and is left alone.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _mask_tail(y, group_sizes):
    """Zero the rows of y [M, n] past sum(group_sizes) (kernels may leave them unwritten)."""
    keep = jnp.arange(y.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)
    return jnp.where(keep[:, None], y, jnp.zeros((), y.dtype))


def _ragged(a, w, group_sizes, impl: str, dims):
    """One ragged dot in a's dtype with fp32 accumulation."""
    if impl == "xla":
        return jax.lax.ragged_dot_general(a, w.astype(a.dtype), group_sizes, dims,
                                          preferred_element_type=jnp.float32).astype(a.dtype)
    # tokamax accumulates in fp32 and writes the output dtype directly (no fp32 [M, N] buffer)
    return _tokamax().ragged_dot_general(a, w.astype(a.dtype), group_sizes, dims, preferred_element_type=a.dtype)


_FWD_DIMS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [1]), ([], [])),
                                              lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, impl: str):
    return _mask_tail(_ragged(x, w, group_sizes, impl, _FWD_DIMS), group_sizes)


def _gmm_fwd(x, w, group_sizes, impl):
    return _gmm(x, w, group_sizes, impl), (w, group_sizes)


def _gmm_bwd(impl, res, g):
    w, group_sizes = res
    dx = _mask_tail(_ragged(g, w, group_sizes, impl, _DX_DIMS), group_sizes)
    return dx, None, None   # w: a constant (stop_gradient in grouped_matmul); group sizes: integers


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x, w, group_sizes, impl: str = "xla"):
    """x [M, K] rows sorted by group; w [E, K, N]; group_sizes [E] int -> [M, N] in x's dtype.

    Gradient w.r.t. x only (w is treated as a constant; see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; choose from {', '.join(IMPLS)}")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul wants x [M, K], w [E, K, N], group_sizes [E]; got {x.shape}, "
                         f"{w.shape}, {group_sizes.shape}")
    return _gmm(x, jax.lax.stop_gradient(w), group_sizes.astype(jnp.int32), impl)


def grouped_dot(counts, impl: Optional[str] = None):
    """(rows [M, K], w [E, K, N]) -> [M, N] in the rows' dtype, rows sorted by expert, counts [E].

    impl None: jax.lax.ragged_dot, differentiable in both. Its output is asked for in the rows'
    dtype (XLA accumulates bf16 dots in fp32 on CPU, GPU and TPU): an fp32 output cast down gives
    the backward an fp32 cotangent, and JAX's transpose of ragged_dot then converts each layer's
    expert weights to fp32 (9 weight-sized converts per MoE layer of a bf16 phase).
    impl 'xla' / 'tokamax': `grouped_matmul` (input gradient only)."""
    if impl is None:
        return lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), counts, preferred_element_type=a.dtype)
    return lambda a, w: grouped_matmul(a, w, counts, impl)


def kernel_available(backend: Optional[str] = None) -> bool:
    """Whether the kernel path has real kernels here: tokamax installed and `backend` (default: the
    default one) a GPU or TPU that this process runs on (a hypothetical backend has no kernels)."""
    backend = backend or jax.default_backend()
    return backend in ("gpu", "tpu") and backend == jax.default_backend() and tokamax_available()
