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
