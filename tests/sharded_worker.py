"""Worker for tests/test_sharding.py: runs in its own process with 8 simulated CPU devices (the main
test process keeps 1), compares sharded against single-device runs and prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py OUT_DIR \
        --variants olmoe,gpt_oss_mxfp4 --meshes expert=8,fsdp=8 --generate [--via-converted fsdp=8]
(meshes are separated by ';' when they contain commas). Checks per (variant, mesh): max |logits
sharded - single| (batch 2, random per-sequence deltas), that every weight's shard shape is what
the rules give, and with --generate the full rewired generate (tokens, final deltas).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402


def build_dir(name: str, root: Path) -> Path:
    import hf_models
    d = root / name
    if (d / "config.json").exists():
        return d
    if name == "gpt_oss_mxfp4":   # the hub's MXFP4 expert format
        from safetensors.torch import save_file
        tm = hf_models.build("gpt_oss")
        d.mkdir(parents=True)
        save_file(hf_models.mxfp4_state_dict(tm), str(d / "model.safetensors"), metadata={"format": "pt"})
        tm.config.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4"}
        (d / "config.json").write_text(json.dumps(cfg))
        return d
    hf_models.build(name).save_pretrained(d)
    return d


def expected_shard_shape(shape, axes, mesh, rules):
    """The rules, read independently of sharding.spec_for (single-axis rules only)."""
    used, out = set(), []
    for n, name in zip(shape, axes):
        a = rules.get(name)
        if isinstance(a, str) and a not in used and mesh.shape[a] > 1 and n % mesh.shape[a] == 0:
            used.add(a)
            out.append(n // mesh.shape[a])
        else:
            out.append(n)
    return tuple(out)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--variants", required=True)
    p.add_argument("--meshes", required=True, help="';'-separated mesh specs")
    p.add_argument("--generate", action="store_true")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--via-converted", default=None, metavar="MESH",
                   help="convert each variant with this mesh (sharded write) and load the meshes from that")
    a = p.parse_args(argv)

    import jax
    import rewire_jax
    import hf_models
    from rewire_jax import RewireOptions
    from rewire_jax.model import sharding
    from rewire_jax.model.weights import declarations, map_weights
    assert len(jax.devices()) == 8, jax.devices()

    root = Path(a.root)
    results = []
    for name in a.variants.split(","):
        d = build_dir(name, root)
        single = rewire_jax.load(d)
        cfg = single.config
        rng = np.random.default_rng(0)
        toks = rng.integers(3, cfg.vocab_size, (2, 12))
        deltas = rng.normal(0, 1.0, (2, *cfg.delta_shape)).astype(np.float32)
        ref_logits = np.asarray(single(toks, deltas))
        prompts = [hf_models.prompt(10, seed=1), hf_models.prompt(7, seed=2)]
        opts = RewireOptions(interval=3, steps=3, lr=0.1)
        if a.generate:
            ref = rewire_jax.generate(single, prompts, a.new_tokens, rewire=opts, eos_token_id=None)
        if a.via_converted:   # written shard by shard on one mesh, restored onto others
            from rewire_jax.io.convert import to_converted
            d = to_converted(d, root / f"{name}-converted", dtype="float32", progress=False, mesh=a.via_converted)
        for spec in a.meshes.split(";"):
            t0 = time.time()
            model = rewire_jax.load(d, mesh=spec)
            mesh = model.config.mesh
            rec = {"variant": name, "mesh": spec}
            rec["logits_diff"] = float(np.abs(np.asarray(model(toks, deltas)) - ref_logits).max())
            decl = declarations(cfg)
            bad = []
            flat_w = jax.tree_util.tree_flatten_with_path(decl, is_leaf=lambda x: hasattr(x, "axes"))[0]
            flat_p = jax.tree.leaves(model.params)
            for (path, w), arr in zip(flat_w, flat_p):
                want = expected_shard_shape(w.shape, w.axes, mesh, sharding.RULES)
                got = tuple(arr.addressable_shards[0].data.shape)
                if got != want or tuple(arr.sharding.shard_shape(arr.shape)) != want:
                    bad.append(f"{jax.tree_util.keystr(path)} {w.axes} {w.shape}: {got} != {want}")
            rec["bad_shards"] = bad
            rec["sharded_leaves"] = sum(math.prod(x.addressable_shards[0].data.shape) < math.prod(x.shape)
                                        for x in flat_p)
            if a.generate:
                out = rewire_jax.generate(model, prompts, a.new_tokens, rewire=opts, eos_token_id=None)
                rec["tokens_equal"] = [list(map(int, x)) for x in out.tokens] == [list(map(int, x)) for x in ref.tokens]
                rec["deltas_diff"] = float(np.abs(np.asarray(out.deltas) - np.asarray(ref.deltas)).max())
                rec["deltas_moved"] = float(np.abs(np.asarray(ref.deltas)).max())
            rec["seconds"] = round(time.time() - t0, 1)
            results.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
        jax.clear_caches()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
