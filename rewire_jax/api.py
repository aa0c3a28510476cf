"""`load` a checkpoint (HF directory or converted) into a `Model`: config + params + tokenizer."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, config as config_lib, hf_io
from .config import ModelConfig
from .model import batched_deltas, forward


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model. `params` is a plain pytree; `config` is static; both can be used directly
    with the functional API (`rewire_jax.model.forward`, `rewire_jax.rewirer(...)`, ...)."""

    config: ModelConfig
    params: Any
    tokenizer: Optional[Any] = None
    path: Optional[str] = None

    def __call__(self, token_ids, deltas=None):
        """token_ids [T] or [B, T] ints; deltas None | [L_moe, E] | [B, L_moe, E] -> logits [B, T, V] fp32."""
        tokens = check_token_ids(token_ids, self.config.vocab_size)
        deltas = batched_deltas(deltas, tokens.shape[0], self.config)
        return _jit_forward(self.params, tokens, deltas, self.config)[0]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model at {self.path} has no tokenizer files; pass token ids instead of text")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def with_params(self, params) -> "Model":
        return dataclasses.replace(self, params=params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _jit_forward(params, tokens, deltas, cfg):
    return forward(params, tokens, deltas, cfg)


def check_token_ids(token_ids, vocab_size: int) -> jnp.ndarray:
    tokens = np.asarray(token_ids)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"token_ids must be a non-empty [T] or [B, T] array of ints, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token id out of range [0, {vocab_size}): min {tokens.min()}, max {tokens.max()}")
    return jnp.asarray(tokens, jnp.int32)


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def load(path: str | Path, dtype: str = "float32", progress: bool = False) -> Model:
    """Load an HF model directory (config.json + safetensors, single file or sharded, per-expert or
    fused expert layout) or a directory written by `python -m convert`.

    dtype: 'float32' (default) or 'bfloat16' for params and activations (router softmax, deltas
    and losses always run in float32).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    dtype = str(jnp.dtype(dtype))
    if checkpoint.is_converted(path):
        cfg, params = checkpoint.load_converted(path)
        cfg = cfg.replace(dtype=dtype)
    else:
        cfg = config_lib.from_hf(config_lib.load_hf_config(path), dtype=dtype)
        params = hf_io.materialise(hf_io.lazy_params(cfg, hf_io.TensorSource.from_dir(path)),
                                   np.dtype(jnp.dtype(dtype)), progress=progress)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Model(cfg, params, load_tokenizer(path), str(path))
