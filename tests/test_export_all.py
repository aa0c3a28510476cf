"""HF export for every architecture: rewire_jax -> HF directory (`convert.to_hf`, `python -m convert
--to-hf`) -> transformers `from_pretrained` -> the same logits (and rewire_jax reads it back)."""
import subprocess
import sys

import numpy as np
import pytest

import hf_models
import rewire_jax
from convert import convert, to_hf
from rewire_jax.bench.torch_reference import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_export_every_architecture_round_trips_through_transformers(hf_dirs, loaded, tmp_path, name):
    _, d = hf_dirs(name)
    _, ours = loaded(name)
    out = to_hf(d, tmp_path / "hf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # nothing half-written left
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 128, (2, 13))
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(ours(ids)), atol=1e-4)
    back = rewire_jax.load(out)
    assert back.config == ours.config
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(ours(ids)))


def test_cli_to_hf_from_a_converted_directory(hf_dirs, tmp_path):
    _, d = hf_dirs("deepseek_v3")
    conv = convert(d, tmp_path / "conv", dtype="float32", progress=False)
    r = subprocess.run([sys.executable, "-m", "convert", "--to-hf", str(conv), str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.arange(3, 17)[None]
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(rewire_jax.load(d)(ids)), atol=1e-4)
    r = subprocess.run([sys.executable, "-m", "convert", "--to-hf", str(conv), str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
