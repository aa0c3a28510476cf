"""Logit parity with the transformers PyTorch models (fp32), with and without router deltas."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hf_models
import rewire_jax
from rewire_jax.bench.torch_reference import hf_logits

OLMOE = ["olmoe", "olmoe_gqa_clip_norm", "olmoe_tied"]


@pytest.mark.parametrize("name", OLMOE)
def test_logit_parity(loaded, name):
    tm, model = loaded(name)
    ids = np.random.default_rng(0).integers(0, 128, (2, 13))
    ref = hf_logits(tm, ids)
    out = np.asarray(model(ids))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()
    # a random nonzero delta: same change in both, and it really moves the logits
    delta = np.random.default_rng(1).normal(0, 1.0, model.config.delta_shape).astype(np.float32)
    ref_d = hf_logits(tm, ids, delta)
    out_d = np.asarray(model(ids, delta))
    assert np.abs(out_d - ref_d).max() <= 1e-4
    assert np.abs(ref_d - ref).max() > 1e-2
    # per-sequence deltas [B, L, E]
    per_seq = np.stack([delta, -delta])
    out_b = np.asarray(model(ids, per_seq))
    assert np.abs(out_b[0] - ref_d[0]).max() <= 1e-4
    assert np.abs(out_b[1] - hf_logits(tm, ids[1:], -delta)[0]).max() <= 1e-4


def test_clip_qkv_is_active(loaded):
    """The clip variant must actually clip, or the test above proves nothing about clipping."""
    tm, model = loaded("olmoe_gqa_clip_norm")
    ids = np.random.default_rng(0).integers(0, 128, (1, 9))
    unclipped = model.with_params(model.params)
    from rewire_jax.api import Model
    no_clip = Model(model.config.replace(clip_qkv=None), model.params)
    assert np.abs(np.asarray(no_clip(ids)) - np.asarray(unclipped(ids))).max() > 1e-3


def test_sharded_checkpoint(hf_dirs, tmp_path):
    tm, _ = hf_dirs("olmoe")
    tm.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = np.arange(3, 14)[None]
    assert np.abs(np.asarray(rewire_jax.load(tmp_path)(ids)) - hf_logits(tm, ids)).max() <= 1e-4


def test_fused_expert_layout(hf_dirs, tmp_path):
    """A raw state_dict() save has fused gate_up_proj [E, 2I, d] / down_proj [E, d, I]."""
    tm, d = hf_dirs("olmoe")
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ids = np.arange(3, 14)[None]
    assert np.abs(np.asarray(rewire_jax.load(tmp_path)(ids)) - hf_logits(tm, ids)).max() <= 1e-4


def test_bfloat16_load_runs(hf_dirs):
    tm, d = hf_dirs("olmoe")
    model = rewire_jax.load(d, dtype="bfloat16")
    ids = np.arange(3, 14)[None]
    out = np.asarray(model(ids))
    assert out.dtype == np.float32
    ref = hf_logits(tm, ids)
    # bf16 weights: loose (a routing flip moves a token's logits), but clearly the same model
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    assert np.median(np.abs(out - ref)) < 0.02 * np.abs(ref).max()
