"""Sharded (8 simulated CPU devices) == single device, for every architecture; shard shapes by the rules.

The 8-device runs happen in a subprocess (`sharded_worker.py`): the device count is fixed when jax
is imported and this test process keeps its single CPU device. CI runs the logits + shard-shape
check for every variant on two meshes and the full rewired generate on three variants (MLA, sinks +
sliding window + MXFP4, plain) with one mesh each; REWIRE_JAX_FULL_SHARDING=1 runs the whole matrix
(every variant x the four meshes, generate included: ~1 h on a shared 2-core CPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_models

WORKER = Path(__file__).parent / "sharded_worker.py"
VARIANTS = [*hf_models.VARIANTS, "gpt_oss_mxfp4"]
MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2", "fsdp=8"]
FULL = os.environ.get("REWIRE_JAX_FULL_SHARDING") == "1"


def run_worker(tmp, variants, meshes, generate: bool, timeout=1500, via_converted=None):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(WORKER), str(tmp), "--variants", ",".join(variants), "--meshes", ";".join(meshes)]
    if generate:
        cmd.append("--generate")
    if via_converted:
        cmd += ["--via-converted", via_converted]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(results, generate: bool):
    assert results
    for r in results:
        where = f"{r['variant']} on {r['mesh']}"
        assert r["logits_diff"] <= 1e-5, (where, r["logits_diff"])
        assert not r["bad_shards"], (where, r["bad_shards"])
        if generate:
            assert r["tokens_equal"], where
            assert r["deltas_diff"] <= 1e-4, (where, r["deltas_diff"])
            assert r["deltas_moved"] > 1e-2, where   # the phases really moved the deltas


def test_sharded_logits_and_shard_shapes_every_variant(tmp_path):
    meshes = MESHES if FULL else ["expert=4,tensor=2", "data=2,expert=2,tensor=2"]
    results = run_worker(tmp_path, VARIANTS, meshes, generate=FULL)
    check(results, generate=FULL)
    # the meshes really shard (olmoe_tied's 6 experts on expert=8 are replicated by the rule)
    assert all(r["sharded_leaves"] > 0 for r in results if (r["variant"], r["mesh"]) != ("olmoe_tied", "expert=8"))


@pytest.mark.parametrize("variant,mesh", [("deepseek_v2_lite", "expert=4,tensor=2"),
                                          ("gpt_oss_mxfp4", "data=2,expert=2,tensor=2"),
                                          ("qwen2_moe", "fsdp=8")])
def test_sharded_rewired_generate(tmp_path, variant, mesh):
    if FULL:
        pytest.skip("covered by the full matrix")
    check(run_worker(tmp_path, [variant], [mesh], generate=True), generate=True)


def test_converted_on_one_mesh_restores_onto_another(tmp_path):
    """`python -m convert --mesh fsdp=8` writes shard by shard; the checkpoint restores onto
    another mesh (and the worker's single-device reference loads it on one device) exactly."""
    results = run_worker(tmp_path, ["deepseek_v2_lite"], ["expert=4,tensor=2"], generate=False,
                         via_converted="fsdp=8")
    check(results, generate=False)
    assert results[0]["sharded_leaves"] > 0


def test_parse_mesh_and_rules():
    from rewire_jax.model import sharding
    assert sharding.parse_mesh("data=1,expert=4,tensor=2") == {"data": 1, "expert": 4, "tensor": 2}
    with pytest.raises(ValueError, match="NAME=SIZE"):
        sharding.parse_mesh("experts=4")
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(expert=4)   # this process has one device
    mesh = sharding.make_mesh()
    assert sharding.describe(mesh) == "data=1,fsdp=1,expert=1,tensor=1"
