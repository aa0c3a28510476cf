"""The README's main command: `rewire-jax generate --prompt ... --compare` on the bundled demo model."""
import os
import subprocess
import sys
from pathlib import Path

from rewire_jax.cli import DEMO_MODEL


def test_demo_model_is_bundled():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (DEMO_MODEL / name).exists(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size <= 20 * 2**20


def test_main_command_offline(tmp_path):
    exe = Path(sys.executable).parent / "rewire-jax"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rewire_jax.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cache = tmp_path / "xla"
    r = subprocess.run(cmd + ["generate", "--prompt", "def fibonacci(n):", "--compare", "--max-new-tokens", "24",
                              "--interval", "8", "--json", str(tmp_path / "o.json"), "--compile-cache", str(cache)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(cache.iterdir()), "--compile-cache wrote no compiled programs"
    assert "===== baseline" in r.stdout and "===== rewired" in r.stdout and "def fibonacci(n):" in r.stdout
    assert "phase @" in r.stdout
