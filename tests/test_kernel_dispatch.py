"""The grouped-matmul kernel path (dispatch 'kernel', rewire_jax/model/grouped.py): tokamax's
ragged_dot (its XLA implementation on this CPU) equals the dense reference in outputs and in the
gradients w.r.t. the deltas, on every architecture's tiny variant; the grouped matmul itself
against per-group matmuls; auto's choice on accelerators.

Cheap on purpose: the variants' configs come from their transformers config classes (no torch
model), [2, 8] tokens, one jit per variant computing both paths."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import hf_models
from rewire_jax import config as config_lib
from rewire_jax.model import forward, init_params, token_nll
from rewire_jax.model import dispatch as D
from rewire_jax.model import grouped

import tokamax  # the accel extra: scripts/setup.sh --test installs it


@pytest.mark.parametrize("impl", grouped.IMPLS)
def test_grouped_matmul_is_per_group_matmul_with_input_gradient_only(impl):
    """Rows of group e times w[e] (an empty group, rows past the groups give zeros); the gradient
    w.r.t. x is dy w[e]^T per group (zero on the tail rows); w is a constant."""
    rng = np.random.default_rng(0)
    M, K, N = 13, 5, 7
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, K, N)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    sizes = [3, 0, 6, 2]                                     # 11 of 13 rows: 2 tail rows
    e_of_row = np.repeat(np.arange(4), sizes)
    want = np.zeros((M, N), np.float32)
    want_dx = np.zeros((M, K), np.float32)
    for r, e in enumerate(e_of_row):
        want[r] = np.asarray(x[r]) @ np.asarray(w[e])
        want_dx[r] = np.asarray(cot[r]) @ np.asarray(w[e]).T

    def loss(x, w):
        y = grouped.grouped_matmul(x, w, jnp.asarray(sizes), impl)
        return jnp.sum(y * cot), y
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(dw))                      # never differentiated: a constant
    with pytest.raises(ValueError, match="unknown grouped-matmul impl"):
        grouped.grouped_matmul(x, w, jnp.asarray(sizes), "cuda")


def test_kernel_path_calls_tokamax_forward_and_backward(monkeypatch):
    """dispatch 'kernel' runs its two expert matmuls (the fused gate|up, then down; separate gate /
    up weights are joined on entry) through tokamax in the forward and two (input gradients only)
    in the backward: the path is really the kernel library's."""
    calls = []
    real = tokamax.ragged_dot_general

    def counting(lhs, rhs, group_sizes, dims, **kw):
        calls.append(tuple(dims.dot_dimension_numbers[0][1]))   # w's contracting axis
        return real(lhs, rhs, group_sizes, dims, **kw)
    monkeypatch.setattr(tokamax, "ragged_dot_general", counting)
    rng = np.random.default_rng(1)
    E, d, I = 4, 8, 6
    ex = {n: jnp.asarray(rng.normal(size=s), jnp.float32)
          for n, s in (("gate_proj", (E, d, I)), ("up_proj", (E, d, I)), ("down_proj", (E, I, d)))}
    x = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
    w, idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(5, E)), jnp.float32)), 2)
    jax.make_jaxpr(jax.grad(lambda x: jnp.sum(D.dispatch(x, w, idx, ex, "kernel"))))(x)
    assert calls == [(1,)] * 2 + [(2,)] * 2, calls          # forward x.w, backward dy.w^T


def test_auto_picks_the_kernel_on_accelerators_with_tokamax():
    olmoe = (512, 8, 64)                                     # tokens, k, E at d 2048, I 1024
    for backend in ("gpu", "tpu"):
        assert D.choose_method(*olmoe, backend, 2048, 1024, kernel=True) == "kernel"
        assert D.choose_method(*olmoe, backend, 2048, 1024, kernel=False) == "ragged"
        assert D.choose_method(1024, 4, 32, backend, 512, 256, kernel=True) == "dense"   # small layer
    assert D.choose_method(*olmoe, "cpu", 2048, 1024, kernel=True) == "blocked"
    assert D.choose_method(1, 8, 64, "gpu", 2048, 1024, kernel=True) == "gather"
    # kernels only for the backend this process runs on (tokamax is installed: imported above)
    here = jax.default_backend()
    assert D.kernel_available() == (here in ("gpu", "tpu"))
    assert not any(D.kernel_available(b) for b in ("gpu", "tpu") if b != here)


def _tiny(name):
    """(ModelConfig, fp32 params) of a tiny variant: weights normal(0.1) like hf_models (the
    library's init is normal(0.02), too flat to make routing decisive), norms 1 + normal(0.1)."""
    cls, _, kw = hf_models.VARIANTS[name]
    hf = getattr(transformers, cls)(**{**hf_models.BASE, **kw}).to_dict()
    cfg = config_lib.from_hf(hf)
    params = init_params(cfg, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(0)

    def scaled(path, a):
        noise = rng.normal(0, 0.1, a.shape).astype(np.float32)
        return jnp.asarray(1 + noise if "norm" in jax.tree_util.keystr(path) else noise)
    return cfg, jax.tree.unflatten(treedef, [scaled(p, a) for p, a in leaves])


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_kernel_path_equals_dense_on_every_tiny_variant(name):
    """fp32: logits and the gradient of the next-token loss w.r.t. the deltas [B, L_moe, E]
    within 1e-5 of the dense path (one jit computing both), the gradients also relative to their
    scale."""
    cfg, params = _tiny(name)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 8)), jnp.int32)
    deltas = jnp.asarray(rng.normal(0, 1.0, (2,) + cfg.delta_shape), jnp.float32)

    def both(params, deltas):
        def loss(deltas, method):
            logits, _ = forward(params, tokens, deltas, cfg, dispatch=method)
            return jnp.mean(token_nll(logits, tokens)), logits
        return [jax.value_and_grad(loss, has_aux=True)(deltas, m) for m in ("dense", "kernel")]
    ((l_ref, y_ref), g_ref), ((l, y), g) = jax.jit(both)(params, deltas)
    assert np.abs(np.asarray(g_ref)).max() > 1e-3           # the deltas really move the loss
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l, l_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    # the gradients are ~1e-2, so also within 1e-5 of their scale: an input gradient of the experts
    # off by 1e-4 (relative) moves them by ~5e-5 of it; the exact path by < 5e-7 (olmoe, mixtral)
    err, scale = np.abs(np.asarray(g) - np.asarray(g_ref)).max(), np.abs(np.asarray(g_ref)).max()
    assert err <= 1e-5 * scale, f"delta gradient off by {err:.3g} at scale {scale:.3g}"
