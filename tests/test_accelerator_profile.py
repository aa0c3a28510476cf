"""The accelerator profile (`python -m rewire_jax.bench.accelerator`) through `scripts/device_check.sh`
on CPU with a tiny shape: the script runs, and the JSON holds every field with consistent numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--backend", "cpu", "--shape", "tiny", "--dtype", "float32", "--batches", "2", "--prompt-lens", "8", "20",
        "--new-tokens", "8", "--interval", "4", "--bandwidth-mb", "16", "--peak-sizes", "128", "256"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/device_check.sh", "--no-setup", *ARGS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "profile.json").read_text()), (out / "profile.txt").read_text(), out


def test_profile_fields_and_consistency(profile):
    res, text, out = profile
    assert "jax" in (out / "env.txt").read_text()
    assert res["backend"] == "cpu" and res["shape"] == "tiny" and res["layers"] == 2
    assert res["bandwidth_Bps"] > 0 and res["matmul_peak_flops"] > 0 and res["weights_bytes"] > 0
    (row,) = res["batches"]
    assert row["batch"] == 2 and len(row["prompt_lens"]) == 2 and all(8 <= L <= 20 for L in row["prompt_lens"])
    for label in ("baseline", "rewired"):
        t = row[label]["timing"]
        assert all(t[k] > 0 for k in ("prefill", "decode", "total")), t
        assert row[label]["decode_ms_per_token"] == pytest.approx(1e3 * t["decode"] / 8)
    assert row["baseline"]["timing"]["optimise"] == 0 and row["rewired"]["timing"]["optimise"] > 0
    assert row["rewired_over_baseline"] == pytest.approx(row["rewired"]["wall_s"] / row["baseline"]["wall_s"])
    # phases at 0 and 4 new tokens (interval 4, 8 new tokens), each against its floors
    assert len(row["phases"]) == 2
    for p in row["phases"]:
        assert p["seconds"] > 0 and p["bytes"] > 0 and p["flops"] > 0
        assert p["pct_byte_floor"] == pytest.approx(100 * p["bytes"] / res["bandwidth_Bps"] / p["seconds"])
        assert p["pct_flop_floor"] == pytest.approx(100 * p["flops"] / res["matmul_peak_flops"] / p["seconds"])
    assert row["phases"][1]["contexts"] == [L + 4 for L in row["prompt_lens"]]
    # decode roofline: 2 rows hit between k (2) and 2k distinct experts per layer per step
    assert 2 <= row["distinct_experts"] <= 4
    sb = row["step_bytes"]
    assert sb["total"] == pytest.approx(sb["weights"] + sb["kv"]) and sb["kv"] > 0
    assert sb["weights"] < res["weights_bytes"]          # not every expert, not the embedding table
    assert row["decode_floor_ms"] == pytest.approx(1e3 * sb["total"] / res["bandwidth_Bps"])
    assert row["decode_pct_roofline"] == pytest.approx(
        100 * row["decode_floor_ms"] / row["baseline"]["decode_ms_per_token"])
    assert row["prefill"]["tokens"] == sum(row["prompt_lens"]) and row["prefill"]["ms"] > 0
    assert row["peak_device_bytes"] == "not available"    # CPU devices keep no memory stats
    oc = row["op_counts"]
    assert oc["batch"] == 2 and oc["backend"] == "cpu" and oc["num_layers"] == 2
    for k in ("dots", "fusions", "custom_calls", "kernels"):
        assert oc["total"][k] == oc["layers"][k] + oc["other"][k]
    assert oc["per_layer"]["dots"] >= 3 and oc["routed_experts"] and row["prefill_routed_experts"]
    assert "routed experts, decode:" in text and "routed experts, prefill / phase:" in text and "% roofline" in text
