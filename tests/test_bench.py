"""The benchmark itself: on a tiny model, both sides of every comparison produce the same tokens and
deltas, and the report carries every quantity the README quotes (timings are not asserted)."""
import json

import pytest

from rewire_jax import bench

pytest.importorskip("torch")


def test_bench_compares_like_with_like(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--hidden", "64", "--layers", "4", "--heads", "4", "--experts", "8", "--top-k", "2",
                "--intermediate", "32", "--vocab", "256", "--prompt-len", "20", "--new-tokens", "12",
                "--interval", "6", "--steps", "2", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert not r.get("errors"), r.get("errors")
    toks = r["tokens"]
    assert toks["jax_baseline_float32"] == toks["hf_float32"]              # greedy == HF generate
    assert toks["jax_rewired_float32"] == toks["torch_rewired_float32"]   # the cycle == the PyTorch way
    assert len(toks["jax_rewired_float32"]) == 12
    assert r["deltas_maxdiff_float32"] < 1e-4
    names = [row["name"] for row in r["rows"]]
    assert names == ["HF generate (float32)", "torch rewired (float32)", "rewire_jax baseline (float32)",
                     "rewire_jax rewired (float32)"]
    rewired = r["rows"][3]
    assert rewired["optimise"] > 0 and rewired["prefill"] > 0 and rewired["decode"] > 0
    assert r["optimise_gflops_float32"] > 0 and r["shape_ceiling_float32"]["weighted"] > 0
    for sel in ("hard", "last_k"):   # lowest updated layer at 3/4 depth: the cached phase == the plain one
        split = r["split_float32"][sel]
        assert split["selected_layers"] == [3]
        assert split["max_abs_delta_diff"] < 1e-5


def test_scratch_dir_is_removed_at_exit(tmp_path):
    """The benchmarks save a random-weight model (~0.5 GB) per run: it must not stay in /tmp."""
    import os
    import subprocess
    import sys
    code = ("from rewire_jax.bench.perf import scratch_dir; import pathlib; d = scratch_dir('rewire_test_'); "
            "(pathlib.Path(d) / 'model.safetensors').write_bytes(b'0' * 1024); print(d)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = out.stdout.strip().splitlines()[-1]
    assert d and not os.path.exists(d)
