"""Hub ids ("allenai/OLMoE-1B-7B-0924") -> a local directory, through huggingface_hub's cache.

As transformers does: `revision=` (branch, tag or commit), `HF_HUB_OFFLINE=1` (only the cache, no
network), `HF_HUB_CACHE` / `HF_HOME` / `cache_dir=` for where the cache lives. Only the files a load
needs are fetched: config.json, the safetensors index and the shards it lists (or
model.safetensors), the tokenizer files, generation_config.json; a converted rewire-jax repo
(`rewire_jax.json` + `params/`) is fetched whole.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

#: small files fetched when present
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def looks_like_hub_id(path) -> bool:
    s = str(path)
    if Path(s).exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        return False
    return all(part and not part.startswith(".") for part in s.split("/"))


def resolve(path, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """A local directory as it is; a hub id -> the snapshot directory in huggingface_hub's cache."""
    if not looks_like_hub_id(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} given for the local directory {path}")
        return Path(path)
    return download(str(path), revision=revision, cache_dir=cache_dir)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def download(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """Fetch (or, offline, find in the cache) the files of `repo_id` that `rewire_jax.load` reads."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = _offline()
    kw = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)

    def get(name: str, required: bool = True) -> Optional[Path]:
        try:
            return Path(hf_hub_download(filename=name, **kw))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            if required:
                how = ("it is not in the local cache and HF_HUB_OFFLINE=1" if offline else str(e))
                raise FileNotFoundError(f"{repo_id}{'@' + revision if revision else ''}: cannot get {name}: "
                                        f"{how}") from None
            return None
        except Exception as e:   # 404 for an optional file, network errors for a required one
            if required:
                raise FileNotFoundError(f"{repo_id}: cannot get {name}: {type(e).__name__}: {e}") from None
            return None

    marker = get("rewire_jax.json", required=False)
    if marker is not None:   # a converted checkpoint: the orbax tree as a whole
        return Path(snapshot_download(**kw))
    config = get("config.json")
    root = config.parent
    index = get("model.safetensors.index.json", required=False)
    if index is not None:
        for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
            get(shard)
    else:
        get("model.safetensors")
    for name in EXTRA_FILES:
        get(name, required=False)
    return root
