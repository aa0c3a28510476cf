"""export.save_hf: random tiny OLMoE params -> HF directory that transformers and rewire_jax.load
both read back exactly."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import rewire_jax
from rewire_jax import export
from rewire_jax.config import ModelConfig, RopeConfig
from rewire_jax.model import forward, init_params, zero_deltas

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model_type="olmoe", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=12, moe_layers=(0, 1), rope=RopeConfig(theta=5000.0),
                qk_norm="flat", max_position_embeddings=64, eos_token_ids=(0,), pad_token_id=1)
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg, seed=0):
    """init_params, with every leaf (norm weights included) perturbed so that no transposition or
    expert-order mistake can hide behind a symmetric or constant tensor."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [np.asarray(l + 0.05 * jax.random.normal(k, l.shape, l.dtype)) for l, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("variant", [
    {},
    {"tie_word_embeddings": True, "norm_topk_prob": True, "clip_qkv": 0.3, "num_kv_heads": 4},
])
def test_save_hf_matches_transformers_and_round_trips(tmp_path, variant):
    cfg = tiny_cfg(**variant)
    params = random_params(cfg)
    out = export.save_hf(cfg, params, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    # config.json is what OlmoeConfig writes; the keys are the hub's per-expert layout.
    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["model_type"] == "olmoe" and hf_json["architectures"] == ["OlmoeForCausalLM"]
    assert hf_json["intermediate_size"] == cfg.moe_intermediate_size
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight").shape == (32, 12)
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in keys
    assert ("lm_head.weight" in keys) != cfg.tie_word_embeddings

    # rewire_jax.load reads back exactly the same config and params.
    loaded = rewire_jax.load(out)
    assert loaded.config == cfg
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded.params)[0])
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), a, err_msg=jax.tree_util.keystr(path))

    # transformers computes the same logits.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11)).astype(np.int32)
    ours, _ = forward(params, tokens, zero_deltas(cfg, 2), cfg)
    hf = transformers.OlmoeForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.max(np.abs(theirs - np.asarray(ours))) <= 1e-5


def test_save_hf_replaces_existing_dir_and_copies_tokenizer(tmp_path):
    cfg = tiny_cfg()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export.save_hf(cfg, random_params(cfg), out, tokenizer=tok_dir, extra_files={"CARD.md": "hi"})
    assert sorted(p.name for p in out.iterdir()) == ["CARD.md", "config.json", "model.safetensors",
                                                      "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tok"]


def test_save_hf_rejects_unexportable_config(tmp_path):
    with pytest.raises(export.ExportError, match="head_dim"):
        export.save_hf(tiny_cfg(head_dim=16), None, tmp_path / "x")
    assert not list(tmp_path.iterdir())
