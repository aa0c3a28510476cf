"""Writing a rewire-jax model back out as a Hugging Face model directory, for every architecture.

The weights are written from the same declarations that loading reads (`model/weights.py`), as
the inverse transforms, in the hub's key layout (per-expert `experts.{e}.{proj}.weight`, Mixtral's
`block_sparse_moe`, gpt-oss's interleaved `gate_up_proj`, unquantized), so that
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and `rewire_jax.load(dir)` both read it.
config.json is the source model's own (when there is one: `hf_config=`), else generated (OLMoE).
The directory appears atomically (`rewire_jax.io.atomic`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from ..model.config import ModelConfig
from ..model.weights import Weight, layer_params, layer_weights, model_weights
from .atomic import atomic_directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")


class ExportError(ValueError):
    """The config cannot be expressed as an HF checkpoint of its model_type."""


# -- config ----------------------------------------------------------------------------------

def hf_config_dict(cfg: ModelConfig) -> dict:
    """Keyword arguments of `transformers.OlmoeConfig` that reproduce `cfg` (checked). Other
    families export with their source config.json (`save_hf(..., hf_config=...)`)."""
    if cfg.model_type != "olmoe":
        raise ExportError(f"a config.json can be generated for model_type 'olmoe' only, got "
                          f"{cfg.model_type!r}: pass hf_config= (the source model's config.json)")
    problems = []
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        problems.append(f"head_dim {cfg.head_dim} * num_heads {cfg.num_heads} != hidden_size "
                        f"{cfg.hidden_size} (OlmoeConfig has no head_dim)")
    if cfg.moe_layers != tuple(range(cfg.num_layers)):
        problems.append(f"OLMoE has a router in every layer; moe_layers={cfg.moe_layers}")
    if cfg.qk_norm != "flat":
        problems.append(f"OLMoE uses the flat q/k norm; qk_norm={cfg.qk_norm!r}")
    rope = cfg.rope
    if rope.rope_type != "default" or rope.interleaved or rope.dim not in (0, cfg.head_dim):
        problems.append(f"only full-head default (rotate-half) RoPE is exportable; got {rope}")
    if problems:
        raise ExportError("cannot export as olmoe: " + "; ".join(problems))
    eos = list(cfg.eos_token_ids)
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else (eos or None)),
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.theta)},
        attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv,
        num_experts_per_tok=cfg.num_experts_per_tok, num_experts=cfg.num_experts,
        norm_topk_prob=cfg.norm_topk_prob,
    )


def _write_config(cfg: ModelConfig, out: Path, dtype: np.dtype, hf_config: Optional[dict]) -> None:
    name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    if hf_config is not None:   # the source's own config: exact for every family
        hf = {k: v for k, v in hf_config.items() if k != "quantization_config"}   # we write dequantized
        hf.update(dtype=name, torch_dtype=name) if "torch_dtype" in hf else hf.update(dtype=name)
        (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        return
    from transformers import OlmoeConfig

    hf_cfg = OlmoeConfig(**hf_config_dict(cfg))
    # What PreTrainedModel.save_pretrained records on top of the bare config.
    hf_cfg.architectures = ["OlmoeForCausalLM"]
    hf_cfg.dtype = name
    hf_cfg.save_pretrained(str(out))


# -- weights ---------------------------------------------------------------------------------

def _write(out: dict, w: Weight, a: np.ndarray, cfg: ModelConfig, prefix: str = "") -> None:
    """The inverse of `rewire_jax.io.hf.read` for one (unstacked) weight, in the hub layout."""
    h, key = w.hf, prefix + w.hf.key
    if h.kind == "id":
        out[key] = a
    elif h.kind == "t":
        out[key] = a.T
    elif h.kind == "experts":           # [E, in, out] -> per-expert [out, in]
        for e in range(a.shape[0]):
            out[f"{key}.{e}.{h.part}.weight"] = a[e].T
    elif h.kind == "gptoss":            # gate / up interleaved in the last axis of gate_up_proj(_bias)
        if h.part in ("down", "down_bias"):
            out[f"{key}.down_proj" + ("_bias" if h.part == "down_bias" else "")] = a
        else:
            name = f"{key}.gate_up_proj" + ("_bias" if h.part.endswith("bias") else "")
            buf = out.setdefault(name, np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype))
            first = 0 if h.part.startswith("gate") else 1
            buf[..., first::2] = a
    elif h.kind == "cat":               # a fused weight: split along the last axis, each part as its kind
        edges = np.cumsum((0,) + tuple(h.sizes))
        for pw, lo, hi in zip(w.parts(), edges[:-1], edges[1:]):
            _write(out, pw, a[..., lo:hi], cfg, prefix)
    else:
        raise ExportError(f"no HF export for mapping kind {h.kind!r}")


def hf_state_dict(cfg: ModelConfig, params: Any, dtype: Optional[Any] = None) -> dict[str, np.ndarray]:
    """Our param tree -> {HF key: numpy array} in the hub layout, read from the weight declarations."""
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    if dtype is not None:
        host = jax.tree.map(lambda a: a.astype(np.dtype(dtype)), host)
    out: dict[str, np.ndarray] = {}
    for name, w in model_weights(cfg).items():
        _write(out, w, host[name], cfg)
    for i in range(cfg.num_layers):
        layer = layer_params(host, cfg, i)
        decl = layer_weights(cfg, i)
        for path, w in jax.tree_util.tree_flatten_with_path(decl, is_leaf=lambda x: isinstance(x, Weight))[0]:
            a = layer
            for k in path:
                a = a[k.key]
            _write(out, w, a, cfg, f"model.layers.{i}.")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- the directory ---------------------------------------------------------------------------

def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        if not found:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
        for f in found:
            shutil.copyfile(src / f, out / f)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    else:
        raise TypeError(f"tokenizer must be a directory path or have save_pretrained, got {type(tokenizer)}")


def save_hf(cfg: ModelConfig, params: Any, out_dir: Union[str, os.PathLike], tokenizer: Any = None,
            dtype: Optional[Any] = None, extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
            hf_config: Optional[dict] = None, overwrite: bool = True) -> Path:
    """Write an HF-format model directory; returns its path.

    cfg, params: a rewire-jax config and its param tree (jax or numpy leaves).
    tokenizer: None, a directory holding tokenizer files (copied), or an object with
        `save_pretrained` (e.g. a transformers tokenizer).
    dtype: dtype of the saved tensors (default: the params' own dtype).
    hf_config: the source model's config.json as a dict (needed for every family but OLMoE).
    extra_files: {relative file name: text or bytes} also written into the directory
        (e.g. a model card), so that they appear atomically with the weights.
    """
    from safetensors.numpy import save_file

    if hf_config is None:
        hf_config_dict(cfg)  # validate before touching params or the disk
    tensors = hf_state_dict(cfg, params, dtype)
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) != 1:   # DeepSeek-V3's fp32 correction bias: save it in the weights' dtype
        main = max(dtypes, key=lambda d: sum(v.size for v in tensors.values() if v.dtype == d))
        tensors = {k: v.astype(main) for k, v in tensors.items()}
        dtypes = {main}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_config(cfg, tmp, dtypes.pop(), hf_config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if target.resolve().parent != tmp.resolve():
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            else:
                target.write_bytes(content)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return Path(out_dir).absolute()
