"""The weight declarations (one per weight, read by init, loading, export, the orbax layout and
sharding) and the scanned layer stacks: scan == unrolled, the plan groups what it should, and the
traced program does not grow with depth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
import rewire_jax
from rewire_jax.model import ModelConfig, RopeConfig, forward, init_params, layer_plan, logical_axes, param_shapes
from rewire_jax.model.weights import Stack, declarations


def tiny(num_layers=4, **kw):
    base = dict(model_type="olmoe", vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=4,
                num_kv_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
                moe_layers=tuple(range(num_layers)), rope=RopeConfig(theta=5000.0), qk_norm="flat",
                max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_every_weight_has_one_declaration_with_its_axes(loaded, name):
    _, model = loaded(name)
    cfg = model.config
    shapes, axes = param_shapes(cfg), logical_axes(cfg)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), model.params)
    assert jax.tree.structure(got, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(
        jax.tree.map(lambda s: (s.shape, s.dtype), shapes), is_leaf=lambda x: isinstance(x, tuple))
    for (path, a), ax in zip(jax.tree_util.tree_flatten_with_path(model.params)[0],
                             jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(ax) == a.ndim, (jax.tree_util.keystr(path), ax, a.shape)
        if "stacks" in jax.tree_util.keystr(path):
            assert ax[0] == "layers"
    assert set(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))) <= {
        ("layers",) + t for t in [("embed",), ("embed", "q_heads"), ("embed", "kv_heads"), ("q_heads", "embed"),
                                  ("q_heads",), ("kv_heads",), ("head_dim",), ("heads",), ("embed", "latent"),
                                  ("latent",), ("latent", "q_heads"), ("embed", "mlp"), ("mlp", "embed"),
                                  ("embed", "experts"), ("experts",), ("experts", "embed", "mlp"),
                                  ("experts", "mlp", "embed"), ("experts", "mlp"), ("experts", "embed"),
                                  ("embed", None)]} | {("vocab", "embed"), ("embed",), ("embed", "vocab")}


def test_layer_plan_groups_repeated_units():
    assert layer_plan(tiny(32)) == (Stack(0, 1, 32),)
    dense_first = tiny(6, moe_layers=(1, 2, 3, 4, 5), intermediate_size=16)
    assert layer_plan(dense_first) == (Stack(0, 1, 1), Stack(1, 1, 5))
    alternating = tiny(8, sliding_window=4, sliding_layers=(0, 2, 4, 6))   # gpt-oss: sliding / full
    assert layer_plan(alternating) == (Stack(0, 2, 4),)
    holes = tiny(5, moe_layers=(0, 2, 3, 4), intermediate_size=16)        # qwen2 mlp_only_layers=[1]
    assert layer_plan(holes) == (Stack(0, 1, 1), Stack(1, 1, 1), Stack(2, 1, 3))


@pytest.mark.parametrize("cfg", [tiny(6), tiny(8, sliding_window=3, sliding_layers=(0, 2, 4, 6)),
                                 tiny(5, moe_layers=(1, 2, 3, 4), intermediate_size=16)], ids=["plain", "alt", "dense0"])
def test_scanned_equals_unrolled(cfg):
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a * 4 if a.ndim > 2 else a, params)    # decisive routing
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 21)), jnp.int32)
    d = jnp.asarray(np.random.default_rng(1).normal(0, 0.3, (2, *cfg.delta_shape)), jnp.float32)
    fwd = jax.jit(forward, static_argnames="cfg")   # one program per layout, not op-by-op dispatch
    outs = {s: fwd(params, tokens, d, cfg.replace(scan_layers=s)) for s in (True, False)}
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(outs[True][1]["idx"], outs[False][1]["idx"])
    opts = rewire_jax.RewireOptions(interval=6, lr=0.05)
    gens = {s: rewire_jax.generate(rewire_jax.Model(cfg.replace(scan_layers=s), params), [[5, 6, 7, 8], [9, 3]], 14,
                                   rewire=opts, eos_token_id=None) for s in (True, False)}
    assert gens[True].tokens == gens[False].tokens
    np.testing.assert_allclose(gens[True].deltas, gens[False].deltas, atol=1e-5)


def test_traced_program_does_not_grow_with_depth():
    """With the layers scanned, the forward's jaxpr has the same number of equations at any depth."""
    def size(n):
        cfg = tiny(n, scan_layers=True)
        tokens = jnp.zeros((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: forward(p, tokens, rewire_jax.zero_deltas(cfg, 1), cfg)[0])(
            param_shapes(cfg))
        return len(jaxpr.jaxpr.eqns)
    assert size(4) == size(32)


def test_init_reads_the_declarations():
    cfg = tiny(3, tie_word_embeddings=True)
    decl = declarations(cfg)
    params = init_params(cfg, jax.random.key(0))
    assert "lm_head" not in params and "lm_head" not in decl
    assert float(params["final_norm"][0]) == 1.0 and params["stacks"]["0"]["0"]["mlp"]["router"].shape == (3, 32, 6)


def _source(tensors: dict):
    from rewire_jax.io.safetensors import TensorSource
    return TensorSource({k: (v.shape, v.dtype.name, lambda v=v: v) for k, v in tensors.items()}, "<test>")


@pytest.mark.parametrize("kw", [{}, dict(model_type="qwen2_moe", attention_bias=True, shared_expert_size=20,
                                         shared_expert_gate=True, qk_norm="none")])
def test_fused_projections_join_the_hf_tensors_and_split_back(kw):
    """qkv_proj = [q_proj^T | k_proj^T | v_proj^T] and the experts' gate_up_proj = [gate | up] per
    expert (the `cat` mapping), read from HF tensors and written back to the same tensors."""
    from rewire_jax.io.export import hf_state_dict
    from rewire_jax.io.hf import lazy_params, materialise
    from rewire_jax.model.weights import layer_params
    cfg = tiny(2, **kw)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(1)))
    hf = hf_state_dict(cfg, params)
    assert not any(k.endswith(("qkv_proj.weight", "gate_up_proj")) for k in hf)   # the hub's split layout
    pre = "model.layers.1."
    lp = layer_params(params, cfg, 1)
    np.testing.assert_array_equal(lp["attn"]["qkv_proj"], np.concatenate(
        [hf[f"{pre}self_attn.{n}_proj.weight"].T for n in "qkv"], -1))
    I = cfg.moe_intermediate_size
    np.testing.assert_array_equal(lp["mlp"]["gate_up_proj"][3], np.concatenate(
        [hf[f"{pre}mlp.experts.3.{n}_proj.weight"].T for n in ("gate", "up")], -1))
    assert lp["mlp"]["gate_up_proj"].shape[-1] == 2 * I
    if cfg.attention_bias:
        np.testing.assert_array_equal(lp["attn"]["qkv_bias"], np.concatenate(
            [hf[f"{pre}self_attn.{n}_proj.bias"] for n in "qkv"]))
        np.testing.assert_array_equal(lp["mlp"]["shared_gate_up_proj"], np.concatenate(
            [hf[f"{pre}mlp.shared_expert.{n}_proj.weight"].T for n in ("gate", "up")], -1))
    back = materialise(lazy_params(cfg, _source(hf)), cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # a region read of a fused weight reads across the parts' boundary exactly
    lazy = lazy_params(cfg, _source(hf))["stacks"]["0"]["0"]["attn"]["qkv_proj"]
    region = (slice(0, 2), slice(3, 9), slice(cfg.num_heads * cfg.head_dim - 5, cfg.num_heads * cfg.head_dim + 7))
    np.testing.assert_array_equal(lazy.part(region), params["stacks"]["0"]["0"]["attn"]["qkv_proj"][region])


def test_a_wrong_part_of_a_fused_weight_is_named():
    from rewire_jax.io.export import hf_state_dict
    from rewire_jax.io.hf import lazy_params
    from rewire_jax.io.safetensors import CheckpointError
    cfg = tiny(2)
    hf = hf_state_dict(cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(1))))
    hf["model.layers.1.self_attn.k_proj.weight"] = hf["model.layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: checkpoint has \(32, 15\), config.json implies \(32, 16\)"):
        lazy_params(cfg, _source(hf))
