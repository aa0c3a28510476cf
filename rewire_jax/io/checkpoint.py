"""rewire-jax's own checkpoint format: an orbax param tree plus our config, written atomically.

Layout of a converted directory:
    params/           orbax StandardCheckpointer tree, laid out as `model/weights.py` declares
    rewire_jax.json   {"format": 2, "config": ModelConfig.to_dict(), "source": ...}  (written last)
    config.json, tokenizer files   copied from the HF directory
A directory without `rewire_jax.json` is never treated as a converted checkpoint, and the whole
directory only appears under its final name after everything inside it was written
(`rewire_jax.io.atomic`). Restoring reads the declared shapes and dtypes as the target.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from ..model.config import ModelConfig
from ..model.weights import param_shapes
from .atomic import atomic_directory

MARKER = "rewire_jax.json"
#: 2: decoder layers stacked per `layer_plan` (1: one subtree per layer, before 0.2)
FORMAT_VERSION = 2
#: bytes orbax may hold in flight while saving (`save_converted`)
SAVE_CONCURRENT_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json")


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def save_converted(out_dir: str | Path, cfg: ModelConfig, params, hf_dir: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        # at most one (largest) array in flight from device to host at a time, so that saving costs
        # the largest array's shard on top of the params, not a second copy of them all
        limit = SAVE_CONCURRENT_BYTES + max([0] + [_local_bytes(a) for a in jax.tree.leaves(params)])
        impl = ocp.BasePyTreeCheckpointHandler(save_concurrent_bytes=limit, save_device_host_concurrent_bytes=limit)
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(handler_impl=impl))
        # jax.Arrays (possibly sharded over a mesh / hosts) are written shard by shard as they are
        tree = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), params)
        ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(tree))
        if hf_dir is not None:
            for name in ("config.json", *TOKENIZER_FILES):
                if (Path(hf_dir) / name).exists():
                    shutil.copy2(Path(hf_dir) / name, tmp / name)
        meta = {"format": FORMAT_VERSION, "config": cfg.to_dict(),
                "source": str(hf_dir) if hf_dir is not None else None}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))  # last: marks the directory complete
    return Path(out_dir).absolute()


def _local_bytes(a) -> int:
    """Bytes of the largest shard of `a` this process holds."""
    if isinstance(a, jax.Array):
        return max(s.data.nbytes for s in a.addressable_shards)
    return int(np.asarray(a).nbytes)


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path).absolute()
    try:
        meta = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MARKER} is not valid JSON ({e}); re-run python -m convert") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not supported "
                         f"(this rewire-jax reads format {FORMAT_VERSION}); re-run python -m convert")
    return ModelConfig.from_dict(meta["config"])


def load_converted(path: str | Path, dtype: str | None = None, shardings=None) -> tuple[ModelConfig, dict]:
    """-> (config, params): host numpy arrays of the declared dtypes, or with `shardings` (a param
    tree of jax Shardings, any mesh: not necessarily the one used at conversion) jax.Arrays that
    orbax restores straight into the shards of this process's devices."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg = read_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    target = param_shapes(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    params = ocp.StandardCheckpointer().restore(path / "params", target)
    return cfg, params
