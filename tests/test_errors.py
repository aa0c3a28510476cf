"""Bad input gets a clear error naming the problem (and leaves nothing half-written)."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_models
import rewire_jax
from rewire_jax import RewireOptions
from rewire_jax.config import ConfigError
from rewire_jax.hf_io import CheckpointError
from rewire_jax.rewire import NonFiniteDeltas


def _copy(d, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(d, out)
    return out


def test_unknown_key(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.surprise.weight"] = np.zeros(3, np.float32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys.*surprise"):
        rewire_jax.load(d)


def test_missing_key(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing key 'model.layers.1.self_attn.k_norm.weight'"):
        rewire_jax.load(d)


def test_shape_mismatch(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.2.mlp.gate.weight"] = np.zeros((7, 64), np.float32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.gate.weight.*\(64, 7\).*\(64, 8\)"):
        rewire_jax.load(d)


def test_unsupported_model_type(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'.*olmoe"):
        rewire_jax.load(d)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewire_jax.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        rewire_jax.load(tmp_path / "empty")


def test_bad_generation_inputs(loaded):
    _, model = loaded("olmoe")
    with pytest.raises(ValueError, match="empty prompt"):
        rewire_jax.generate(model, [[]], 4)
    with pytest.raises(ValueError, match="does not fit in cache_len"):
        rewire_jax.generate(model, [hf_models.prompt(12)], 8, cache_len=16)
    with pytest.raises(ValueError, match="out of range"):
        rewire_jax.generate(model, [[5, 999]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rewire_jax.generate(model, [[5, 6]], 0)
    with pytest.raises(ValueError, match="deltas have shape"):
        rewire_jax.generate(model, [[5, 6]], 2, deltas=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="token_ids"):
        model(np.zeros((1, 0), int))


@pytest.mark.parametrize("kw, match", [
    (dict(selection="best"), "selection='best' is not valid; choose one of soft, hard"),
    (dict(soft_mode="x"), "soft_mode"), (dict(confidence="x"), "confidence"), (dict(loss="avg"), "loss"),
    (dict(ratio=0.0), "ratio"), (dict(steps=0), "steps"), (dict(lr=float("nan")), "lr"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        RewireOptions(**kw)


def test_nan_deltas_stop_with_clear_error(loaded):
    _, model = loaded("olmoe")
    bad = np.zeros(model.config.delta_shape, np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteDeltas, match="NaN/inf"):
        rewire_jax.generate(model, [hf_models.prompt(5)], 4, deltas=bad)
    with pytest.raises(NonFiniteDeltas):  # a learning rate that blows the deltas up mid-generation
        rewire_jax.generate(model, [hf_models.prompt(8)], 4, rewire=RewireOptions(lr=1e39, steps=3),
                            eos_token_id=None)
