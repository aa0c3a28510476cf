"""Bad files and inputs found by trying them as a new user would: each gets a clear error (or a
warning) that names the file or the numbers, never a raw traceback."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest

import hf_models
import rewire_jax
from rewire_jax.model import ConfigError
from rewire_jax.io.safetensors import CheckpointError


def _copy(d, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(d, out)
    return out


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rewire_jax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_truncated_safetensors_names_the_file(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        rewire_jax.load(d)
    r = _cli("generate", "--model", str(d), "--prompt-ids", "3,4,5", "--max-new-tokens", "2")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_malformed_config_names_the_file(hf_dirs, tmp_path):
    d = _copy(hf_dirs("olmoe")[1], tmp_path)
    (d / "config.json").write_text('{\n  "model_type": "olmoe",\n')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        rewire_jax.load(d)
    r = _cli("generate", "--model", str(d), "--prompt-ids", "3,4,5", "--max-new-tokens", "2")
    assert r.returncode == 2 and str(d / "config.json") in r.stderr and "Traceback" not in r.stderr


def test_prompt_past_max_position_embeddings_warns(loaded):
    _, model = loaded("olmoe")                       # max_position_embeddings 256
    prompt = hf_models.prompt(250)
    with pytest.warns(UserWarning, match=r"exceeds the model's max_position_embeddings \(256\)"):
        rewire_jax.generate(model, [prompt], 12, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rewire_jax.generate(model, [prompt[:20]], 4, eos_token_id=None)


def test_cli_prints_no_pytorch_notice_without_torch(hf_dirs, tmp_path):
    """transformers prints "PyTorch was not found" on import when torch is absent (the main job's
    install has no torch): hide torch from the import system and run the CLI."""
    _, d = hf_dirs("olmoe")
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util\n_f = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, p=None: None if n.split('.')[0] == 'torch' else _f(n, p)\n")
    base = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TRANSFORMERS_VERBOSITY": "warning"}
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.is_torch_available())"],
                           capture_output=True, text=True, env={**base, **env})
    assert probe.stdout.strip() == "False" and "PyTorch was not found" in probe.stderr   # the notice is real
    r = subprocess.run([sys.executable, "-m", "rewire_jax.cli", "generate", "--prompt", "def f(x):", "--max-new-tokens",
                        "4", "--quiet"], capture_output=True, text=True, env={**base, **env})
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr + r.stdout
