"""The README's main command: `rewire-jax generate --prompt ... --compare` on the bundled demo model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rewire_jax
from rewire_jax import analysis, compile_cache
from rewire_jax.cli import DEMO_MODEL, NEXT_STEPS


def test_demo_model_is_bundled():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (DEMO_MODEL / name).exists(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size <= 20 * 2**20


def test_main_command_offline(tmp_path):
    """Offline, the compile cache on by default (in the per-user directory), the summary table and
    its --json twin, whose numbers are recomputed here from `rewire_jax.analysis.trace` and the
    model's logits (another code path: one sequence per call, unpadded)."""
    exe = Path(sys.executable).parent / "rewire-jax"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rewire_jax.cli"]
    env = {k: v for k, v in os.environ.items() if k != "REWIRE_JAX_COMPILE_CACHE"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "home-cache"))
    r = subprocess.run(cmd + ["generate", "--prompt", "def fibonacci(n):", "--compare", "--max-new-tokens", "24",
                              "--interval", "8", "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    caches = list((tmp_path / "home-cache" / "rewire-jax" / "jax-cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("cpu-") and any(caches[0].iterdir()), caches
    assert "===== baseline" in r.stdout and "===== rewired" in r.stdout and "def fibonacci(n):" in r.stdout
    assert r.stdout.index("===== rewired") < r.stdout.index("===== what rewiring did =====")
    assert "phase  context  loss before  loss after" in r.stdout and "|delta|" in r.stdout
    assert r.stdout.rstrip().endswith(NEXT_STEPS)

    out = json.loads((tmp_path / "o.json").read_text())
    s = out["summary"]
    model = rewire_jax.load(DEMO_MODEL)
    prompt, new = model.encode("def fibonacci(n):"), out["tokens"]
    deltas = np.asarray(out["deltas"], np.float32)
    seq, P, n = np.array(prompt + new), len(prompt), len(new)
    assert s["generated_tokens"] == n == 24
    assert s["phases"] == [{k: p[k] for k in ("context_len", "loss_before", "loss_after")} for p in out["phases"]]
    assert [p["context_len"] for p in s["phases"]] == [P, P + 8, P + 16]
    # routing: the experts each generated token is sent to, without and with the deltas
    base, rew = analysis.trace(model, seq), analysis.trace(model, seq, deltas)
    diff = np.any(np.sort(base.idx, -1) != np.sort(rew.idx, -1), axis=-1)[:, P:]   # [L, n]
    assert s["routing_changed"] == diff.any(axis=0).mean()
    assert s["routing_changed_per_layer"] == list(diff.mean(axis=1))
    assert 0 < s["routing_changed"] <= 1
    # NLL of the rewired continuation under zero and under the final deltas
    for key, d in (("nll_baseline", None), ("nll_rewired", deltas)):
        logits = np.asarray(model(seq, d), np.float64)[0]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -logp[np.arange(P - 1, P + n - 1), seq[P:]].mean()
        np.testing.assert_allclose(s[key], nll, rtol=1e-5)
    # per layer: the delta's norm and its most positive / negative experts
    for l, row in enumerate(s["layers"]):
        assert row["layer"] == model.config.moe_layers[l]
        np.testing.assert_allclose(row["delta_norm"], np.linalg.norm(deltas[l]), rtol=1e-6)
        assert [e for e, _ in row["up"]] == list(np.argsort(-deltas[l], kind="stable")[:2])
        assert [v for _, v in row["up"]] == sorted(deltas[l].tolist(), reverse=True)[:2]
        assert [v for _, v in row["down"]] == sorted(deltas[l].tolist())[:2]


def test_compile_cache_dir_is_per_backend_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = compile_cache.default_dir("cpu")
    assert a.parent == tmp_path / "rewire-jax" / "jax-cache" and a.name.startswith("cpu-")
    assert compile_cache.default_dir("cpu") == a
    monkeypatch.setattr(compile_cache, "cpu_features", lambda: "another cpu")
    assert compile_cache.default_dir("cpu") != a
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--no-compile-cache"):
        compile_cache.enable(tmp_path / "file" / "sub")


def test_demo_tokenizer_is_autotokenizers_without_torch():
    """The generic fast tokenizer is read directly (AutoTokenizer would read the model config and
    import transformers' configuration code and torch on the way): the same tokenizer, no torch."""
    from rewire_jax.api import import_transformers, load_tokenizer

    ours, auto = load_tokenizer(DEMO_MODEL), import_transformers().AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    assert type(ours) is type(auto) and ours.get_vocab() == auto.get_vocab()
    assert ours.all_special_tokens == auto.all_special_tokens and ours.eos_token_id == auto.eos_token_id
    text = (DEMO_MODEL / "MODEL_CARD.md").read_text()
    assert ours.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
    code = ("import sys; from rewire_jax.api import load_tokenizer; from rewire_jax.cli import DEMO_MODEL; "
            "assert load_tokenizer(DEMO_MODEL) is not None; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_fast_cpu_compile_sets_the_flag_only_before_the_backend_starts():
    code = ("import os; from rewire_jax import compile_cache as c; import jax; "
            "first = c.fast_cpu_compile(); flags = os.environ['XLA_FLAGS']; again = c.fast_cpu_compile(); "
            "jax.numpy.ones(1).block_until_ready(); os.environ['XLA_FLAGS'] = ''; late = c.fast_cpu_compile(); "
            "print(first, again, late, flags)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "False", "--xla_backend_optimization_level=0"]


def test_rerun_reads_rope_tables_without_torch(tmp_path):
    """A rerun traces every program again (JAX's persistent cache keys on the lowered program) and
    RoPE's frequencies come from torch (bit-identical to transformers'): the first run keeps torch's
    table beside its compile cache, the second reads it and never imports torch (~1 s)."""
    torch = pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k not in ("REWIRE_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = ("import sys; from rewire_jax.cli import main; "
            "rc = main(['generate', '--prompt-ids', '1,2,3', '--max-new-tokens', '2', '--baseline', '--quiet']); "
            "print(rc, 'torch' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["0", "True"], ["0", "False"]], [r.stderr[-2000:] for r in runs]
    cfg = rewire_jax.load(DEMO_MODEL).config
    rope = cfg.rope
    dim = rope.dim or cfg.head_dim
    tables = list(tmp_path.glob(f"rewire-jax/jax-cache/cpu-*/rope-*/pos-freqs-{float(rope.theta)!r}-{dim}-torch-*.npy"))
    assert len(tables) == 1, list(tmp_path.rglob("*.npy"))
    want = (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)).numpy()
    got = np.load(tables[0])
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint32), want.view(np.uint32))
