"""Hub ids through huggingface_hub's cache, offline, against a cache directory built here in the
hub cache's own layout (models--ORG--NAME/{refs,snapshots/COMMIT,blobs})."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import rewire_jax
from rewire_jax.io import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def populate(cache: Path, repo: str, src: Path, commit: str, ref: str = "main", files=None) -> Path:
    """Put src's files into `cache` exactly as huggingface_hub stores a download."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    for f in files or sorted(p.name for p in src.iterdir() if p.is_file()):
        data = (src / f).read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


def test_hub_id_loads_offline_from_cache(hf_dirs, tmp_path, monkeypatch):
    _, d = hf_dirs("olmoe")
    cache = tmp_path / "hub"
    populate(cache, "allenai/OLMoE-tiny", d, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert hub.looks_like_hub_id("allenai/OLMoE-tiny") and not hub.looks_like_hub_id(str(d))
    m = rewire_jax.load("allenai/OLMoE-tiny")
    ref = rewire_jax.load(d)
    ids = np.arange(3, 15)[None]
    assert np.array_equal(np.asarray(m(ids)), np.asarray(ref(ids)))
    assert Path(m.path).parts[-2:] == ("snapshots", COMMIT)

    # revision= picks another snapshot; a revision or repo that is not cached fails clearly offline
    snap2 = populate(cache, "allenai/OLMoE-tiny", d, OTHER, ref="v2")
    assert Path(rewire_jax.load("allenai/OLMoE-tiny", revision="v2").path) == snap2
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        rewire_jax.load("allenai/not-cached")


def test_hub_fetches_only_needed_files(hf_dirs, tmp_path, monkeypatch):
    """Sharded index: config, index, the listed shards; extra files in the repo are not needed."""
    _, d = hf_dirs("olmoe")
    src = tmp_path / "src"
    shutil.copytree(d, src)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    cache = tmp_path / "hub"
    # the cache lacks an unrelated big file (e.g. original/*.pth): loading must not ask for it
    populate(cache, "org/sharded", src, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = hub.resolve("org/sharded")
    assert (path / "model-00001-of-00001.safetensors").exists()
    # a listed shard missing from the cache is an error naming it
    (path / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00001-of-00001"):
        hub.resolve("org/sharded")
