"""`load` a checkpoint (HF directory or converted) into a `Model`: config + params + tokenizer."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from .io import checkpoint, families, hf
from .model import ModelConfig, batched_deltas, forward
from .model.decoder import CausalLM, graph_of, model_graph
from .model.nn import arch
from .model.weights import param_shapes


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model. `params` is a plain pytree; `config` is static; both can be used directly
    with the functional API (`rewire_jax.model.forward`, `rewire_jax.rewirer(...)`, ...).
    `module` is the same model as a flax.nnx `CausalLM` over the same arrays; a modified module
    becomes a model again with `with_module` (docs/flax.md)."""

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

    @property
    def module(self) -> CausalLM:
        """The model as a flax.nnx `CausalLM` holding this model's arrays (no copies). Each access
        builds a new module: modify the one you got, then `model.with_module(it)`."""
        return nnx.merge(model_graph(self.config).full, self.params)

    def with_module(self, module: CausalLM) -> "Model":
        """A Model that runs `module` (e.g. this model's `.module` with a layer's router swapped):
        its params are the module's Params, its config carries the module graph, so `generate`,
        `rewirer`, the queue and the eval harness run the modified modules. `self` is unchanged."""
        if not isinstance(module, CausalLM):
            raise TypeError(f"with_module takes a rewire_jax CausalLM (e.g. model.module), got {type(module).__name__}")
        if module.cfg != arch(self.config):
            raise ValueError("with_module: the module was built for another architecture than this model's "
                             f"({module.cfg.model_type}, {module.cfg.num_layers} layers vs {self.config.model_type}, "
                             f"{self.config.num_layers} layers); start from this model's `.module`")
        params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        return dataclasses.replace(self, config=self.config.replace(modules=graph_of(module)), params=params)


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


def import_transformers():
    """transformers, imported without its "PyTorch was not found" notice (we only use its
    tokenizers and configs, which need no torch)."""
    if "transformers" not in sys.modules:
        old = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if old is None:
                del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = old
    return sys.modules["transformers"]


#: tokenizer_config.json classes that are the generic fast tokenizer (tokenizer.json alone)
GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    transformers = import_transformers()
    if (path / "tokenizer.json").exists() and _tokenizer_class(path) in GENERIC_TOKENIZERS:
        # the same tokenizer AutoTokenizer builds, without reading the model config first: that
        # imports transformers' configuration code (and torch): ~2.5 s on a loaded 2-core machine
        # even with torch already imported (RoPE imports torch at trace time, model/layers.py)
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _tokenizer_class(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load(path: str | Path, dtype: str = "float32", progress: bool = False, dispatch: Optional[str] = None,
         mesh: Any = None, rules: Any = None, revision: Optional[str] = None, remat: Optional[str] = None) -> Model:
    """Load an HF model directory (config.json + safetensors, single file or sharded, per-expert or
    fused expert layout), a directory written by `python -m convert`, or a hub id
    ("allenai/OLMoE-1B-7B-0924", through huggingface_hub's cache: `revision`, HF_HUB_OFFLINE).

    dtype: 'float32' (default) or 'bfloat16' for params and activations (router softmax, deltas
    and losses always run in float32).
    dispatch: how the routed experts are computed ('auto', 'dense', 'gather', 'blocked', 'ragged', 'kernel';
    see rewire_jax.model.dispatch); stored in `model.config.dispatch`.
    mesh: None (one device), a `jax.sharding.Mesh`, 'data=1,expert=4,tensor=2' or a dict of mesh
    axis sizes (rewire_jax.model.sharding): every tensor is read straight into the shards this
    process owns (never more than one full tensor on the host), laid out by the logical axis
    `rules` (default `sharding.RULES`); the MoE then runs expert-parallel. Stored in
    `model.config.mesh`.
    remat: per-layer rematerialisation in the optimise phase ('auto', 'layer', 'none').
    """
    from .io import hub
    from .model import sharding

    path = hub.resolve(path, revision=revision)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    dtype = str(jnp.dtype(dtype))
    mesh = sharding.mesh_from_spec(mesh)
    converted = checkpoint.is_converted(path)
    cfg = checkpoint.read_config(path).replace(dtype=dtype) if converted else \
        families.from_hf(families.load_hf_config(path), dtype=dtype)
    shardings = None
    if mesh is not None:
        shardings = sharding.param_shardings(cfg, mesh, rules)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, param_shapes(cfg))
    if converted:
        _, params = checkpoint.load_converted(path, dtype, shardings=shardings)
    else:
        params = hf.read_params(path, cfg, progress, shardings=shardings)
    if dispatch is not None:
        cfg = cfg.replace(dispatch=dispatch)
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    if mesh is not None:
        cfg = cfg.replace(mesh=mesh)
    return Model(cfg, params, load_tokenizer(path), str(path))
