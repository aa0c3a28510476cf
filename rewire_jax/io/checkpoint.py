"""rewire-jax's own checkpoint format: an orbax param tree plus our config, written atomically.

Layout of a converted directory:
    params/NAME/      one orbax checkpoint per leaf of the param tree that `model/weights.py`
                      declares (NAME: its path, e.g. `stacks.0.0.experts_gate`), written one leaf at
                      a time so that converting never holds more than one tensor (format 3)
    rewire_jax.json   {"format": 3, "config": ModelConfig.to_dict(), "source": ...}  (written last)
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
from .hf import place
from .safetensors import Lazy, concat

MARKER = "rewire_jax.json"
#: 3: one orbax item per leaf (2: one orbax tree for all leaves; 1: one subtree per layer)
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
#: on-disk chunk size of a leaf (the unit a region read touches), as the pieces `io.hf.place` copies
CHUNK_BYTES = 64 << 20
#: bytes orbax may hold in flight while saving (`save_converted`)
SAVE_CONCURRENT_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json")


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def leaf_names(tree) -> list[str]:
    """Dotted paths of a param tree's leaves, in tree order ('embed', 'stacks.0.0.router', ...)."""
    paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or callable(x))[0]
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths]


def save_converted(out_dir: str | Path, cfg: ModelConfig, params, hf_dir: str | Path | None = None,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Write `params` (a param tree whose leaves are arrays, or zero-argument callables that
    produce them) leaf by leaf: each callable is called, its array written and released before the
    next, so a streamed conversion holds one tensor at a time (plus orbax's host copy of it)."""
    import orbax.checkpoint as ocp

    leaves = jax.tree_util.tree_leaves(params, is_leaf=callable)
    names = leaf_names(params)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        it = zip(names, leaves)
        if progress:
            from tqdm import tqdm
            it = tqdm(list(it), desc="converting", unit="tensor")
        ckptr, ckptr_limit = None, -1
        for name, leaf in it:
            array = leaf() if callable(leaf) else leaf
            array = array if isinstance(array, jax.Array) else np.asarray(array)
            if _local_bytes(array) > ckptr_limit:
                # orbax's in-flight bytes bounded by this array's largest shard: one copy of it at most
                ckptr_limit = SAVE_CONCURRENT_BYTES + _local_bytes(array)
                impl = ocp.BasePyTreeCheckpointHandler(save_concurrent_bytes=ckptr_limit,
                                                       save_device_host_concurrent_bytes=ckptr_limit)
                ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(handler_impl=impl))
            # a jax.Array (possibly sharded over a mesh / hosts) is written shard by shard as it is
            # chunks of <= CHUNK_BYTES on disk, so that a restore reads any region without the whole leaf
            ckptr.save(tmp / "params" / name, args=ocp.args.PyTreeSave(
                {"value": array}, save_args={"value": ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)}))
            del array
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


def _read_meta(path: Path) -> dict:
    """The marker file, checked: valid JSON of a format this version reads."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / MARKER} is not valid JSON ({e}); re-run python -m convert") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not supported "
                         f"(this rewire-jax reads formats {READABLE_FORMATS}); re-run python -m convert")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(_read_meta(Path(path).absolute())["config"])


def load_converted(path: str | Path, dtype: str | None = None, shardings=None) -> tuple[ModelConfig, dict]:
    """-> (config, params): host numpy arrays of the declared dtypes, or with `shardings` (a param
    tree of jax Shardings, any mesh: not necessarily the one used at conversion) jax.Arrays read
    chunk by chunk straight into the shards of this process's devices (format 2: orbax's restore)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = _read_meta(path)
    cfg = ModelConfig.from_dict(meta["config"])
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    target = param_shapes(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    if meta["format"] == 2:
        return cfg, ocp.StandardCheckpointer().restore(path / "params", target)
    leaves, treedef = jax.tree_util.tree_flatten(target)
    shards = [None] * len(leaves) if shardings is None else jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    restored = []
    for name, t, sh in zip(leaf_names(target), leaves, shards):
        lazy = _leaf(path / "params", name)
        if tuple(lazy.shape) != tuple(t.shape):
            raise ValueError(f"{path / 'params' / name} holds shape {lazy.shape}, the config implies "
                             f"{tuple(t.shape)}; re-run python -m convert")
        # region by region into this process's shards (never the whole leaf on the host twice)
        restored.append(np.asarray(lazy.load()).astype(t.dtype, copy=False) if sh is None else place(lazy, sh, t.dtype))
    return cfg, jax.tree_util.tree_unflatten(treedef, restored)


#: fused leaves (issue 19) -> the leaves a checkpoint written before the fusion holds instead,
#: joined along the last axis in this order
UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "qkv_bias": ("q_bias", "k_bias", "v_bias"),
           "gate_up_proj": ("gate_proj", "up_proj"), "gate_up_bias": ("gate_bias", "up_bias"),
           "shared_gate_up_proj": ("shared_gate_proj", "shared_up_proj")}


def _leaf(params_dir: Path, name: str) -> Lazy:
    """Leaf `name`; a fused leaf missing from a checkpoint converted before the fused layout is
    read as its unfused leaves joined (same values, so old conversions keep loading)."""
    head, _, last = name.rpartition(".")
    parts = UNFUSED.get(last, ())
    if not (params_dir / name).exists() and parts and all((params_dir / f"{head}.{p}").exists() for p in parts):
        return concat([leaf_reader(params_dir / f"{head}.{p}") for p in parts], -1)
    return leaf_reader(params_dir / name)


def leaf_reader(leaf_dir: Path) -> Lazy:
    """One leaf written by `save_converted` as a Lazy tensor whose regions tensorstore reads from the
    leaf's orbax directory (only the on-disk chunks a region touches)."""
    import tensorstore as ts

    try:
        meta = json.loads((leaf_dir / "_METADATA").read_text())
        kvstore = ({"driver": "ocdbt", "base": leaf_dir.absolute().as_uri() + "/", "path": "value/"}
                   if meta.get("use_ocdbt", True) else {"driver": "file", "path": str(leaf_dir.absolute() / "value")})
        arr = ts.open({"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": kvstore},
                      open=True, read=True).result()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the converted tensor {leaf_dir}: {e}; the checkpoint is incomplete or "
                         f"damaged: re-run python -m convert") from None
    return Lazy(arr.shape, arr.dtype.numpy_dtype, lambda: arr.read().result(), str(leaf_dir),
                lambda index: arr[index].read().result(), grid=tuple(arr.chunk_layout.read_chunk.shape))
