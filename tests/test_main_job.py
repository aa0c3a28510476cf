"""The README's main command: `rewire-jax generate --prompt ... --compare` on the bundled demo model."""
import os
import subprocess
import sys
import time
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
    t0 = time.perf_counter()
    r = subprocess.run(cmd + ["generate", "--prompt", "def fibonacci(n):", "--compare", "--max-new-tokens", "24",
                              "--interval", "8", "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "===== baseline" in r.stdout and "===== rewired" in r.stdout and "def fibonacci(n):" in r.stdout
    assert "phase @" in r.stdout
    assert wall < 120  # README promises < 60 s for the default length; generous for a loaded CI box
