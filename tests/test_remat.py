"""Per-layer rematerialisation (ModelConfig.remat): the same deltas as without, and less memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rewire_jax
from rewire_jax.api import Model
from rewire_jax.model import forward
from rewire_jax.model.transformer import REMAT_AUTO_TOKENS, use_remat


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss", "deepseek_v2_lite"])
def test_remat_same_deltas(loaded, name):
    _, model = loaded(name)
    tokens = np.asarray([[5, 9, 17, 33, 60, 71, 99, 4, 12, 7, 8, 3, 44, 90, 21, 5]] * 2)
    outs = {}
    for remat in ("none", "layer"):
        cfg = model.config.replace(remat=remat)
        rw = rewire_jax.rewirer(Model(cfg, model.params), steps=3, lr=0.1)
        outs[remat] = np.asarray(rw.step(model.params, np.zeros((2, *cfg.delta_shape), np.float32), tokens).deltas)
    assert np.abs(outs["none"]).max() > 1e-2
    np.testing.assert_allclose(outs["layer"], outs["none"], atol=1e-5, rtol=0)


def test_remat_auto_threshold(loaded):
    _, model = loaded("olmoe")
    cfg = model.config
    assert cfg.remat == "auto"
    assert not use_remat(cfg, REMAT_AUTO_TOKENS - 1) and use_remat(cfg, REMAT_AUTO_TOKENS)
    assert use_remat(cfg.replace(remat="layer"), 1) and not use_remat(cfg.replace(remat="none"), 10 ** 6)


def test_remat_lowers_backward_memory(loaded):
    """XLA's own buffer plan: the delta-gradient at context 512 needs less temporary memory with
    per-layer remat (no per-layer activations / attention probabilities kept for the backward)."""
    _, model = loaded("olmoe")
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 128, (1, 512)), jnp.int32)
    temp = {}
    for remat in ("none", "layer"):
        cfg = model.config.replace(remat=remat, max_position_embeddings=1024)

        def loss(d):
            return jnp.sum(forward(model.params, tokens, d, cfg)[0][..., 0])
        d = jnp.zeros((1, *cfg.delta_shape), jnp.float32)
        temp[remat] = jax.jit(jax.grad(loss)).lower(d).compile().memory_analysis().temp_size_in_bytes
    assert temp["layer"] < 0.7 * temp["none"], temp


@pytest.mark.parametrize("window,sinks", [(None, False), (40, True)])
def test_sequential_attention_equals_blocked(window, sinks):
    """layers.attend(lean=True) (query blocks in a loop, probabilities recomputed in the backward)
    against the default blocked path: outputs and gradients, GQA, padding of the last block."""
    from rewire_jax.model import layers as L
    rng = np.random.default_rng(0)
    B, T, H, K, D = 2, 300, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.float32) for n in (H, K, K))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = L.attention_mask(pos, pos, None, window)
    s = jnp.asarray(rng.normal(size=(H,)), jnp.float32) if sinks else None
    cot = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)

    def run(lean):
        f = lambda q, k, v: jnp.sum(L.attend(q, k, v, mask, 0.3, s, causal=True, window=window, lean=lean) * cot)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    (a, ga), (b, gb) = run(False), run(True)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=0)
