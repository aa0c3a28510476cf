"""`python -m convert`: orbax output, atomic, loadable, with clear errors."""
import subprocess
import sys

import numpy as np
import pytest

import rewire_jax
from convert import convert
from rewire_jax import checkpoint


def test_convert_round_trip(hf_dirs, tmp_path):
    tm, d = hf_dirs("olmoe")
    out = convert(d, tmp_path / "conv", dtype="float32", progress=False)
    assert checkpoint.is_converted(out) and (out / "config.json").exists()
    a, b = rewire_jax.load(d), rewire_jax.load(out)
    assert a.config == b.config
    ids = np.arange(3, 15)[None]
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    bf = rewire_jax.load(convert(d, tmp_path / "bf16", progress=False))  # default: bf16 storage
    assert bf.config.dtype == "float32" and np.abs(np.asarray(bf(ids)) - np.asarray(a(ids))).max() < 0.5


def test_cli_writes_with_progress_and_refuses_existing(hf_dirs, tmp_path):
    _, d = hf_dirs("olmoe")
    out = tmp_path / "c"
    run = lambda *extra: subprocess.run([sys.executable, "-m", "convert", str(d), str(out), *extra],
                                        capture_output=True, text=True)
    r = run("--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr  # tqdm progress bar
    r = run()
    assert r.returncode == 2 and "already exists" in r.stderr
    assert run("--overwrite").returncode == 0


def test_interrupted_conversion_leaves_nothing_loadable(hf_dirs, tmp_path, monkeypatch):
    _, d = hf_dirs("olmoe")

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.shutil, "copy2", boom)  # dies after the params were written
    with pytest.raises(KeyboardInterrupt):
        convert(d, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial directory remains


def test_bad_checkpoint_fails_before_writing(hf_dirs, tmp_path):
    _, d = hf_dirs("olmoe")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(rewire_jax.hf_io.CheckpointError, match="model.safetensors"):
        convert(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_format_2_checkpoint_still_loads(hf_dirs, tmp_path):
    """A directory written before format 3 (one orbax tree for all leaves) loads to the same model."""
    import json
    import shutil

    import orbax.checkpoint as ocp
    _, d = hf_dirs("olmoe")
    new = convert(d, tmp_path / "v3", dtype="float32", progress=False)
    cfg, params = checkpoint.load_converted(new)
    old = tmp_path / "v2"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(old / "params", params)
    ckptr.wait_until_finished()
    shutil.copy2(new / "config.json", old / "config.json")
    meta = json.loads((new / checkpoint.MARKER).read_text())
    (old / checkpoint.MARKER).write_text(json.dumps({**meta, "format": 2}))
    ids = np.arange(3, 15)[None]
    np.testing.assert_array_equal(np.asarray(rewire_jax.load(old)(ids)), np.asarray(rewire_jax.load(new)(ids)))


def test_checkpoint_converted_before_the_fused_projections_still_loads(hf_dirs, tmp_path):
    """A format-3 directory with unfused leaves (q_proj / k_proj / v_proj, gate_proj / up_proj, as
    written before issue 19's fused layout) loads to the same params as the HF directory."""
    import jax
    from rewire_jax.model.weights import param_shapes
    _, d = hf_dirs("qwen2_moe")   # q/k/v biases, a gated shared expert
    model = rewire_jax.load(d)
    cfg, params = model.config, jax.tree.map(np.asarray, model.params)

    def unfuse(tree):
        out = {}
        for n, a in tree.items():
            if isinstance(a, dict):
                out[n] = unfuse(a)
            elif n in checkpoint.UNFUSED:
                parts = checkpoint.UNFUSED[n]
                if n.startswith("qkv"):
                    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
                    edges = [hq, hq + hk]
                else:
                    edges = [a.shape[-1] // 2]
                out.update(zip(parts, np.split(a, edges, axis=-1)))
            else:
                out[n] = a
        return out

    old = unfuse(params)
    assert "q_proj" in old["stacks"]["0"]["0"]["attn"] and "qkv_proj" not in old["stacks"]["0"]["0"]["attn"]
    checkpoint.save_converted(tmp_path / "old", cfg, old, d)
    cfg2, back = checkpoint.load_converted(tmp_path / "old")
    assert cfg2 == cfg
    assert jax.tree.structure(back) == jax.tree.structure(param_shapes(cfg))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
