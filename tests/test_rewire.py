"""The rewiring cycle: gradients, the torch oracle, batching, selection semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
import rewire_jax
from rewire_jax import RewireOptions
from rewire_jax.model import forward
from rewire_jax.rewire import sequence_losses
from rewire_jax.bench.torch_reference import reference_generate

# every selection mode and every option, each against the independent torch implementation
ORACLE_CASES = [
    dict(),
    dict(selection="hard"),
    dict(selection="hard", ratio=0.34, confidence="inverse"),
    dict(selection="all"),
    dict(selection="random", seed=3),
    dict(selection="reverse"),
    dict(selection="last_k", last_k=2),
    dict(soft_mode="grad"),
    dict(confidence="inverse"),
    dict(loss="sum", lr=0.01),
    dict(persist_optimizer=False),
    dict(continuous=False),
    dict(steps=2, lr=0.2, weight_decay=0.1, eps=1e-3),
]


@pytest.mark.parametrize("opts", ORACLE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_torch_reference(loaded, opts):
    """Four phases each. The defaults run contexts 12-30 (phases in two context buckets, a cache of
    32); every other option contexts 4-13 (one bucket: half the compiled programs, the same checks)."""
    tm, model = loaded("olmoe")
    n, new, interval = (12, 20, 6) if not opts else (4, 12, 3)
    prompt = hf_models.prompt(n)
    ref = reference_generate(tm, prompt, new, interval=interval, eos_token_id=None, **opts)
    out = rewire_jax.generate(model, [prompt], new, rewire=RewireOptions(interval=interval, **opts),
                              eos_token_id=None)
    assert out.tokens[0] == ref["tokens"]
    assert np.abs(out.deltas[0] - ref["deltas"]).max() <= 1e-4
    assert len(out.phases) == len(ref["phases"]) == (1 if opts.get("continuous") is False else 4)
    for r, p in zip(ref["phases"], out.phase_dicts()):
        assert p["context_len"] == r["context_len"]
        assert abs(p["loss_before"] - r["loss_before"]) <= 1e-4 * max(1, abs(r["loss_before"]))
        assert abs(p["loss_after"] - r["loss_after"]) <= 1e-4 * max(1, abs(r["loss_after"]))
        np.testing.assert_allclose(p["scores"], r["scores"], rtol=1e-4)
        np.testing.assert_allclose(p["weights"], r["weights"], atol=1e-5)


def test_oracle_on_gqa_variant_with_eos(loaded):
    tm, model = loaded("olmoe_gqa_clip_norm")
    prompt = hf_models.prompt(10, seed=4)
    free = reference_generate(tm, prompt, 16, interval=5, eos_token_id=None)["tokens"]
    eos = free[7]
    ref = reference_generate(tm, prompt, 16, interval=5, eos_token_id=eos)
    out = rewire_jax.generate(model, [prompt], 16, rewire=RewireOptions(interval=5), eos_token_id=eos)
    assert out.tokens[0] == ref["tokens"] and out.tokens[0][-1] == eos
    assert np.abs(out.deltas[0] - ref["deltas"]).max() <= 1e-4


def test_gradient_matches_finite_differences(loaded):
    _, model = loaded("olmoe_gqa_clip_norm")
    cfg = model.config
    tokens = jnp.asarray([hf_models.prompt(10)])
    lengths = jnp.array([10])

    @jax.jit
    def loss(d):
        return sequence_losses(forward(model.params, tokens, d[None], cfg)[0], tokens, lengths)[0]

    d0 = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, cfg.delta_shape), jnp.float32)
    g = np.asarray(jax.jit(jax.grad(loss))(d0))
    assert np.abs(g).max() > 1e-4
    rng = np.random.default_rng(1)
    for _ in range(4):
        v = rng.normal(size=cfg.delta_shape).astype(np.float32)
        v /= np.linalg.norm(v)
        h = 1e-2
        fd = (float(loss(d0 + h * v)) - float(loss(d0 - h * v))) / (2 * h)
        # top-k switches make the loss piecewise smooth; h is small enough to rarely cross one
        assert abs(fd - float(np.sum(g * v))) <= 2e-3 + 2e-2 * abs(fd), (fd, np.sum(g * v))


def test_batched_rewiring_equals_alone(loaded):
    _, model = loaded("olmoe")
    prompts = [hf_models.prompt(7, seed=1), hf_models.prompt(13, seed=2), hf_models.prompt(4, seed=3)]
    opts = RewireOptions(interval=5, selection="hard")
    batched = rewire_jax.generate(model, prompts, 12, rewire=opts, eos_token_id=None)
    for b, p in enumerate(prompts):
        alone = rewire_jax.generate(model, [p], 12, rewire=opts, eos_token_id=None)
        assert batched.tokens[b] == alone.tokens[0]
        assert np.abs(batched.deltas[b] - alone.deltas[0]).max() <= 1e-5


def test_batched_with_eos_freezes_finished_sequences(loaded):
    _, model = loaded("olmoe")
    p0, p1 = hf_models.prompt(7, seed=1), hf_models.prompt(9, seed=5)
    opts = RewireOptions(interval=3)
    free = rewire_jax.generate(model, [p0], 12, rewire=opts, eos_token_id=None).tokens[0]
    eos = free[3]
    batched = rewire_jax.generate(model, [p0, p1], 12, rewire=opts, eos_token_id=eos)
    for b, p in enumerate([p0, p1]):
        alone = rewire_jax.generate(model, [p], 12, rewire=opts, eos_token_id=eos)
        assert batched.tokens[b] == alone.tokens[0]
        assert np.abs(batched.deltas[b] - alone.deltas[0]).max() <= 1e-5


def test_hard_selection_leaves_other_layers_at_zero(loaded):
    _, model = loaded("olmoe_gqa_clip_norm")
    for interval in (100, 4):  # one phase, then several (the union of selected layers grows)
        out = rewire_jax.generate(model, [hf_models.prompt(12)], 12,
                                  rewire=RewireOptions(interval=interval, selection="hard", ratio=0.34),
                                  eos_token_id=None)
        moved = np.abs(out.deltas[0]).max(axis=-1) > 0
        selected = np.zeros(model.config.num_moe_layers, bool)
        for p in out.phases:
            selected |= p.weights[0] > 0
        assert np.array_equal(moved, selected)
        assert np.all(out.deltas[0][~selected] == 0.0)
        if interval == 100:
            assert len(out.phases) == 1 and selected.sum() == 1


def test_first_phase_lowers_context_loss(loaded):
    _, model = loaded("olmoe")
    out = rewire_jax.generate(model, [hf_models.prompt(16)], 4, rewire=RewireOptions(), eos_token_id=None)
    first = out.phases[0]
    assert first.loss_after[0] < first.loss_before[0]


def test_step_api_as_in_the_design_card(loaded):
    """`rewire.step(params, deltas, tokens)` as a user writes it."""
    _, model = loaded("olmoe")
    rewire = rewire_jax.rewirer(model)
    params, deltas = model.params, rewire_jax.zero_deltas(model.config)
    tokens = np.array(hf_models.prompt(12))
    out = rewire.step(params, deltas, tokens)
    assert out.deltas.shape == model.config.delta_shape and np.abs(np.asarray(out.deltas)).max() > 0
    out2 = rewire.step(params, out.deltas, tokens, opt_state=out.opt_state, phase_index=1)
    assert not np.allclose(np.asarray(out2.deltas), np.asarray(out.deltas))
    # the same phase through generate's machinery gives the same deltas
    gen = rewire_jax.generate(model, [list(tokens)], 1, rewire=RewireOptions(), eos_token_id=None)
    assert np.abs(gen.deltas[0] - np.asarray(out.deltas)).max() <= 1e-6
