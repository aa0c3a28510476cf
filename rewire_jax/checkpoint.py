"""rewire-jax's own checkpoint format: an orbax param tree plus our config, written atomically.

Layout of a converted directory:
    params/           orbax StandardCheckpointer tree
    rewire_jax.json   {"format": 1, "config": ModelConfig.to_dict(), "source": ...}  (written last)
    config.json, tokenizer files   copied from the HF directory
A directory without `rewire_jax.json` is never treated as a converted checkpoint, and the whole
directory only appears under its final name after everything inside it was written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from .config import ModelConfig

MARKER = "rewire_jax.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json")


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def save_converted(out_dir: str | Path, cfg: ModelConfig, params, hf_dir: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()
        if hf_dir is not None:
            for name in ("config.json", *TOKENIZER_FILES):
                if (Path(hf_dir) / name).exists():
                    shutil.copy2(Path(hf_dir) / name, tmp / name)
        meta = {"format": FORMAT_VERSION, "config": cfg.to_dict(),
                "source": str(hf_dir) if hf_dir is not None else None}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))  # last: marks the directory complete
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_converted(path: str | Path) -> tuple[ModelConfig, dict]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not supported "
                         f"(this rewire-jax reads format {FORMAT_VERSION}); re-run python -m convert")
    cfg = ModelConfig.from_dict(meta["config"])
    params = ocp.StandardCheckpointer().restore(path / "params")
    return cfg, params
