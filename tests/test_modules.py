"""The flax.nnx model definitions: the module of every tiny variant equals the functional forward,
its Param state is exactly `model.params`, and a customised module (a router subclass) runs
through the rewiring cycle, generate, the queue and the eval harness without touching the stock
model."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
import rewire_jax
from rewire_jax import RewireOptions, Sampling, modules
from rewire_jax.model import forward, logical_axes, zero_deltas
from rewire_jax.model.routers import SoftmaxTopK

DEMO = Path(rewire_jax.__file__).parent / "demo" / "model"


def _paths(tree):
    return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def _check_module(model):
    cfg = model.config
    lm = model.module
    assert isinstance(lm, modules.CausalLM)
    state = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    assert _paths(state) == _paths(model.params)
    for (p, a), (q, b) in zip(jax.tree_util.tree_leaves_with_path(state),
                              jax.tree_util.tree_leaves_with_path(model.params)):
        assert p == q and a is b, jax.tree_util.keystr(p)        # the same arrays: no copies
    # sharding metadata: the declared logical axes of every weight
    axes = jax.tree.map(lambda v: v.get_metadata()["out_sharding"], nnx.state(lm, nnx.Param),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert nnx.to_pure_dict(axes) == logical_axes(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    deltas = (rng.normal(size=(2, *cfg.delta_shape)) * 0.5).astype(np.float32)
    out = np.asarray(lm(tokens, deltas))
    ref = np.asarray(jax.jit(forward, static_argnames="cfg")(model.params, jnp.asarray(tokens),
                                                               jnp.asarray(deltas), cfg)[0])
    assert out.dtype == np.float32 and out.shape == (2, 9, cfg.vocab_size)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, np.asarray(model(tokens, deltas)))


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_module_equals_forward_and_holds_the_params(loaded, name):
    _check_module(loaded(name)[1])


def test_demo_module_equals_forward_and_holds_the_params():
    _check_module(rewire_jax.load(DEMO))


def test_from_config_builds_every_module_kind(loaded):
    cfg = loaded("deepseek_v2_glg")[1].config           # MLA, a dense first layer, group-limited router
    lm = rewire_jax.from_config(cfg, rngs=nnx.Rngs(0))
    kinds = {type(m).__name__ for _, m in nnx.iter_modules(lm)}
    assert {"CausalLM", "DecoderLayer", "MLAttention", "MoEBlock", "DenseMLP"} <= kinds
    assert {type(b.routing).__name__ for b in lm.moe_blocks()} == {"GroupLimited"}
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    same = rewire_jax.init_params(cfg, nnx.Rngs(0).params())   # the same draw as init_params
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, same))
    assert lm(np.arange(5)).shape == (1, 5, cfg.vocab_size)


# -- a custom router ---------------------------------------------------------------------------------

class BanFirstExpert(SoftmaxTopK):
    """Routes as the stock router, with expert 0 never chosen."""

    def choose(self, logits, correction_bias=None):
        return super().choose(logits.at[:, 0].set(-jnp.inf), correction_bias)


class Tempered(SoftmaxTopK):
    """Routes on z~ / temperature."""

    def __init__(self, k, norm_topk_prob=False, scaling=1.0, temperature=1.0):
        super().__init__(k, norm_topk_prob, scaling)
        self.temperature = temperature

    def __call__(self, logits, correction_bias=None):
        return super().__call__(logits / self.temperature, correction_bias)


def test_tempered_router_module():
    z = jax.random.normal(jax.random.key(0), (7, 8)) * 3
    w, i = Tempered(2, temperature=4.0)(z)
    ref_w, ref_i = jax.lax.top_k(jax.nn.softmax(z / 4.0, axis=-1), 2)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ref_i))
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=1e-6)


@pytest.fixture(scope="module")
def demo_and_banned():
    model = rewire_jax.load(DEMO)
    lm = model.module
    for block in lm.moe_blocks():
        r = block.routing
        block.routing = BanFirstExpert(r.k, r.norm_topk_prob, r.scaling)
    return model, model.with_module(lm)


def test_custom_router_changes_routing_and_leaves_the_stock_model(demo_and_banned):
    model, banned = demo_and_banned
    cfg = model.config
    assert model.config.modules is None and banned.config.modules is not None
    assert all(type(b.routing) is SoftmaxTopK for b in model.module.moe_blocks())
    assert all(type(b.routing) is BanFirstExpert for b in banned.module.moe_blocks())
    tokens = jnp.asarray(model.encode("def fibonacci(n):\n    if n < 2:\n        return n\n"))[None]
    fwd = jax.jit(forward, static_argnames="cfg")
    _, aux = fwd(model.params, tokens, zero_deltas(cfg, 1), cfg)
    _, aux_b = fwd(banned.params, tokens, zero_deltas(cfg, 1), banned.config)
    assert bool(jnp.any(aux["idx"] == 0)) and not bool(jnp.any(aux_b["idx"] == 0))
    # the first MoE layer's router logits are the same (only the choice from them differs)
    np.testing.assert_array_equal(np.asarray(aux["logits"][:, 0]), np.asarray(aux_b["logits"][:, 0]))


def test_rewiring_cycle_generate_and_queue_on_a_custom_router(demo_and_banned):
    model, banned = demo_and_banned
    before = jax.tree.map(np.asarray, model.params)
    prompts = [model.encode("def add(a, b):"), model.encode("import os\n\ndef list_files(path):")]
    # contexts 7-14: every phase in one context bucket (one phase and one prefill program per model)
    opts = RewireOptions(interval=3, steps=2)
    stock = rewire_jax.generate(model, prompts, max_new_tokens=6, rewire=opts)
    mod = rewire_jax.generate(banned, prompts, max_new_tokens=6, rewire=opts)
    assert all(np.isfinite(np.asarray(d)).all() for d in mod.deltas)
    assert any(np.abs(np.asarray(d)).max() > 0 for d in mod.deltas)
    assert [list(t) for t in mod.tokens] != [list(t) for t in stock.tokens]
    q = rewire_jax.generate_queue(banned, prompts, max_new_tokens=6, rewire=opts, batch_size=2)
    assert [list(t) for t in q.tokens] == [list(t) for t in mod.tokens]
    # the phase itself on the custom model: finite deltas that lower the context loss
    rw = rewire_jax.rewirer(banned, opts)
    out = rw.step(banned.params, zero_deltas(banned.config, 1), jnp.asarray(prompts[1])[None])
    assert np.isfinite(np.asarray(out.deltas)).all()
    # the stock model is untouched: same arrays, same outputs as before
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before,
                                     jax.tree.map(np.asarray, model.params)))
    again = rewire_jax.generate(model, prompts, max_new_tokens=6, rewire=opts)
    assert [list(t) for t in again.tokens] == [list(t) for t in stock.tokens]


def test_eval_harness_runs_a_custom_router(demo_and_banned, tmp_path):
    from rewire_jax.eval.runner import EvalConfig, read_records, run_eval
    _, banned = demo_and_banned
    fix = Path(__file__).parent / "fixtures" / "eval" / "gsm8k_small.jsonl"
    cfg = EvalConfig(model="demo+ban0", limit=2, batch_size=2, max_new_tokens={"gsm8k": 16},
                     rewire={"interval": 8, "steps": 1}, sources={"gsm8k": str(fix)})
    run_eval(banned, {"gsm8k": str(fix)}, ["baseline", "rewire"], tmp_path, cfg, progress=False)
    recs = read_records(tmp_path / "samples.jsonl")
    assert sorted(r["method"] for r in recs) == ["baseline", "baseline", "rewire", "rewire"]


def test_with_module_refuses_another_architecture(loaded, demo_and_banned):
    model, _ = demo_and_banned
    other = loaded("olmoe")[1].module
    with pytest.raises(ValueError, match="another architecture"):
        model.with_module(other)
    with pytest.raises(TypeError, match="CausalLM"):
        model.with_module(model.module.stacks["0"]["0"])
