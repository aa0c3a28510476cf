"""Writing the rewire-jax param tree back out as a Hugging Face model directory.

`save_hf` is the exact inverse of the OLMoE converter in `families/olmoe.py`: it writes the
`config.json` that `transformers.OlmoeConfig.save_pretrained` writes and a single
`model.safetensors` with the hub's per-expert key layout
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, spec section 2.1 / 5), so that
both `transformers.OlmoeForCausalLM.from_pretrained(dir)` and `rewire_jax.load(dir)` read it.

The directory appears atomically: everything is written to a temporary sibling directory that is
renamed to `out_dir` at the end (an existing `out_dir` is replaced only once the new one is
complete).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from .config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")


class ExportError(ValueError):
    """The config cannot be expressed as an HF checkpoint of its model_type."""


# -- config ----------------------------------------------------------------------------------

def hf_config_dict(cfg: ModelConfig) -> dict:
    """Keyword arguments of `transformers.OlmoeConfig` that reproduce `cfg` (checked)."""
    if cfg.model_type != "olmoe":
        raise ExportError(f"save_hf supports model_type 'olmoe' only, got {cfg.model_type!r}")
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


def _write_config(cfg: ModelConfig, out: Path, dtype: np.dtype) -> None:
    from transformers import OlmoeConfig

    hf_cfg = OlmoeConfig(**hf_config_dict(cfg))
    # What PreTrainedModel.save_pretrained records on top of the bare config.
    hf_cfg.architectures = ["OlmoeForCausalLM"]
    hf_cfg.dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    hf_cfg.save_pretrained(str(out))


# -- weights ---------------------------------------------------------------------------------

def hf_state_dict(cfg: ModelConfig, params: Any, dtype: Optional[Any] = None) -> dict[str, np.ndarray]:
    """Our param tree -> {HF key: numpy array} in the hub layout (inverse of families/olmoe.py)."""
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    if dtype is not None:
        host = jax.tree.map(lambda a: a.astype(np.dtype(dtype)), host)
    t = lambda a: np.ascontiguousarray(np.swapaxes(a, -1, -2))  # flax kernel [in,out] <-> [out,in]
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": host["embed_tokens"]["embedding"],
        "model.norm.weight": host["norm"]["weight"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = t(host["lm_head"]["kernel"])
    for i in range(cfg.num_layers):
        p, lp = f"model.layers.{i}", host[f"layers_{i}"]
        out[f"{p}.input_layernorm.weight"] = lp["input_layernorm"]["weight"]
        out[f"{p}.post_attention_layernorm.weight"] = lp["post_attention_layernorm"]["weight"]
        attn = lp["self_attn"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = t(attn[name]["kernel"])
            if "bias" in attn[name]:
                out[f"{p}.self_attn.{name}.bias"] = attn[name]["bias"]
        out[f"{p}.self_attn.q_norm.weight"] = attn["q_norm"]["weight"]
        out[f"{p}.self_attn.k_norm.weight"] = attn["k_norm"]["weight"]
        mlp = lp["mlp"]
        out[f"{p}.mlp.gate.weight"] = t(mlp["gate"]["kernel"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            stacked = mlp[name]  # [E, in, out]
            for e in range(cfg.num_experts):
                out[f"{p}.mlp.experts.{e}.{name}.weight"] = t(stacked[e])
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
            dtype: Optional[Any] = None,
            extra_files: Optional[Mapping[str, Union[str, bytes]]] = None) -> Path:
    """Write an HF-format OLMoE model directory; returns its path.

    cfg, params: a rewire-jax config (model_type 'olmoe') and its param tree (jax or numpy leaves).
    tokenizer: None, a directory holding tokenizer files (copied), or an object with
        `save_pretrained` (e.g. a transformers tokenizer).
    dtype: dtype of the saved tensors (default: the params' own dtype).
    extra_files: {relative file name: text or bytes} also written into the directory
        (e.g. a model card), so that they appear atomically with the weights.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    hf_config_dict(cfg)  # validate before touching params or the disk
    tensors = hf_state_dict(cfg, params, dtype)
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) != 1:
        raise ExportError(f"params have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_config(cfg, tmp, dtypes.pop())
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
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return out_dir
    # Replace an existing directory: move it aside, move the new one in, then delete the old one
    # (restoring it if the second rename fails).
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "previous")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "previous", out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
