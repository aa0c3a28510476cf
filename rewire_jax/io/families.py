"""The HF families: one table, `FAMILIES`, of `model_type` -> parse(config.json dict) -> ModelConfig
(spec: shared/docs/moe-architectures.md). The weights a config implies, with their HF keys, are
declared in `rewire_jax.model.weights`; `rewire_jax.io.hf` reads them, `rewire_jax.io.export`
writes them. Adding an architecture: a parser here (+ its row in FAMILIES), its weights in
`model/weights.py` if it has new ones, its router in `model/routers.py` if it routes differently.

  olmoe                 GQA, flat q/k norm, clip_qkv; softmax-top-k in every layer
  qwen2_moe, qwen3_moe  q/k/v biases + gated shared expert (qwen2), per-head q/k norm (qwen3);
                        `decoder_sparse_step` / `mlp_only_layers` dense layers (no delta row)
  mixtral               sliding window on every layer; legacy `block_sparse_moe` keys
  deepseek_v2, _v3      MLA, YaRN + mscale, dense first layers, shared experts; greedy /
                        group-limited (V2) and sigmoid noaux_tc (V3) routers
  gpt_oss               sinks, sliding/full alternation, YaRN, clamped SwiGLU, MXFP4 experts
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..model.config import ConfigError, MLAConfig, ModelConfig, RopeConfig, RouterConfig
from ..model.dispatch import GPTOSS_ALPHA


# -- helpers shared by the parsers ---------------------------------------------------------

def token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in np.atleast_1d(value))


def rope_from_hf(hf: dict, dim: int = 0, interleaved: bool = False) -> RopeConfig:
    """Read rope settings from either the nested `rope_parameters` (transformers 5 saves) or the
    legacy top-level `rope_theta` + `rope_scaling` (hub files)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default' and 'yarn')")
    kw: dict[str, Any] = dict(theta=float(theta), dim=dim, rope_type=rope_type, interleaved=interleaved)
    if rope_type == "yarn":
        orig = merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        factor = merged.get("factor")
        if factor is None:
            factor = hf["max_position_embeddings"] / orig
        kw.update(factor=float(factor), original_max_position_embeddings=int(orig),
                  beta_fast=float(merged.get("beta_fast") or 32.0),
                  beta_slow=float(merged.get("beta_slow") or 1.0),
                  mscale=merged.get("mscale"), mscale_all_dim=merged.get("mscale_all_dim"),
                  attention_factor=merged.get("attention_factor"),
                  truncate=bool(merged.get("truncate", True)))
    return RopeConfig(**kw)


def hf_common(hf: dict, model_type: str, eps_default: float = 1e-6) -> dict:
    """ModelConfig fields that every HF decoder config spells the same way."""
    heads = hf["num_attention_heads"]
    return dict(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", eps_default),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        eos_token_ids=token_ids(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"))


# -- the families ------------------------------------------------------------------------------

def parse_olmoe(hf: dict) -> ModelConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        model_type="olmoe",
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"],
        moe_layers=tuple(range(hf["num_hidden_layers"])),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope=rope_from_hf(hf),
        qk_norm="flat", clip_qkv=hf.get("clip_qkv"),
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        eos_token_ids=token_ids(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
    )


def moe_layers(hf: dict) -> tuple[int, ...]:
    """HF rule: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(n) if i not in only and (i + 1) % step == 0)
    if not layers or not _num_experts(hf):
        raise ConfigError(f"{hf.get('model_type')} config has no MoE layer (num_experts="
                          f"{_num_experts(hf)}, decoder_sparse_step={step}, mlp_only_layers="
                          f"{sorted(only)}): there is nothing to rewire")
    return layers


def _num_experts(hf: dict) -> int:
    # transformers 5 saves Qwen3-MoE's count as num_local_experts; hub files say num_experts
    return hf.get("num_experts") or hf.get("num_local_experts") or 0


def _qwen_common(hf: dict, model_type: str) -> dict:
    return dict(
        **hf_common(hf, model_type),
        num_experts=_num_experts(hf), num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], intermediate_size=hf.get("intermediate_size", 0),
        moe_layers=moe_layers(hf), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        rope=rope_from_hf(hf))


def parse_qwen2(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < hf.get("max_window_layers", n) and window else "full_attention"
        for i in range(n)]
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ()
    return ModelConfig(
        **_qwen_common(hf, "qwen2_moe"), attention_bias=bool(hf.get("qkv_bias", True)),
        shared_expert_size=hf.get("shared_expert_intermediate_size") or 0, shared_expert_gate=True,
        sliding_window=window if sliding else None, sliding_layers=sliding)


def parse_qwen3(hf: dict) -> ModelConfig:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return ModelConfig(
        **_qwen_common(hf, "qwen3_moe"), qk_norm="head", attention_bias=bool(hf.get("attention_bias", False)),
        sliding_window=window, sliding_layers=tuple(range(hf["num_hidden_layers"])) if window else ())


def parse_mixtral(hf: dict) -> ModelConfig:
    window = hf.get("sliding_window")
    return ModelConfig(
        **hf_common(hf, "mixtral", eps_default=1e-5),
        num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf["intermediate_size"], moe_layers=tuple(range(hf["num_hidden_layers"])),
        norm_topk_prob=True, rope=rope_from_hf(hf),
        sliding_window=window or None, sliding_layers=tuple(range(hf["num_hidden_layers"])) if window else ())


V2_TOPK_METHODS = {"greedy": "softmax_topk", "group_limited_greedy": "group_limited"}


def _deepseek_common(hf: dict, model_type: str, router: RouterConfig, norm_topk_prob: bool,
            rope_interleave: bool) -> ModelConfig:
    if hf.get("mlp_bias"):
        raise ConfigError(f"{model_type} with mlp_bias=true is not supported (no released checkpoint uses it)")
    mla = MLAConfig(kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                    q_lora_rank=hf.get("q_lora_rank"))
    n, first_dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    common = hf_common(hf, model_type)
    # MLA shares one latent across heads; HF's head_dim here is the rope dim (a config gotcha)
    common.update(num_kv_heads=common["num_heads"], head_dim=mla.qk_head_dim)
    n_shared = hf.get("n_shared_experts") or 0
    return ModelConfig(
        **common, attention="mla", mla=mla, attention_bias=bool(hf.get("attention_bias", False)),
        rope=rope_from_hf(hf, dim=mla.qk_rope_head_dim, interleaved=rope_interleave),
        num_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], intermediate_size=hf["intermediate_size"],
        moe_layers=tuple(range(first_dense, n)), norm_topk_prob=norm_topk_prob, router=router,
        shared_expert_size=hf["moe_intermediate_size"] * n_shared)


def parse_v2(hf: dict) -> ModelConfig:
    method = hf.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise ConfigError(f"deepseek_v2 topk_method {method!r} is not supported; transformers implements "
                          f"{', '.join(V2_TOPK_METHODS)}")
    router = RouterConfig(kind=V2_TOPK_METHODS[method], n_group=hf.get("n_group") or 1,
                          topk_group=hf.get("topk_group") or 1,
                          routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    return _deepseek_common(hf, "deepseek_v2", router, norm_topk_prob=False, rope_interleave=True)


def parse_v3(hf: dict) -> ModelConfig:
    router = RouterConfig(kind="sigmoid_group", n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                          routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)))
    return _deepseek_common(hf, "deepseek_v3", router, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   rope_interleave=bool(hf.get("rope_interleave", True)))


DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}


def parse_gpt_oss(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    if abs(hf.get("swiglu_alpha", GPTOSS_ALPHA) - GPTOSS_ALPHA) > 1e-9:
        raise ConfigError(f"gpt_oss swiglu_alpha={hf['swiglu_alpha']} is not supported (only {GPTOSS_ALPHA})")
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ConfigError(f"gpt_oss quantization {quant!r} is not supported (only mxfp4 or none)")
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        hf = {**hf, "rope_scaling": DEFAULT_ROPE}  # the GptOssConfig default
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    window = hf.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ()
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        **hf_common(hf, "gpt_oss", eps_default=1e-5),
        num_experts=hf["num_local_experts"],
        num_experts_per_tok=hf.get("num_experts_per_tok") or hf["experts_per_token"],
        moe_intermediate_size=hf["intermediate_size"], moe_layers=tuple(range(n)),
        rope=rope_from_hf(hf), attention_bias=bias, o_proj_bias=bias, attention_sinks=True,
        sliding_window=window if sliding else None, sliding_layers=sliding,
        router=RouterConfig(kind="topk_softmax", bias=True),
        expert_activation="gptoss", expert_bias=True, swiglu_limit=float(hf.get("swiglu_limit", 7.0)))


#: model_type -> parser. The one registry of supported architectures.
FAMILIES: dict[str, Callable[[dict], ModelConfig]] = {
    "olmoe": parse_olmoe, "qwen2_moe": parse_qwen2, "qwen3_moe": parse_qwen3, "mixtral": parse_mixtral,
    "deepseek_v2": parse_v2, "deepseek_v3": parse_v3, "gpt_oss": parse_gpt_oss,
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """Parse an HF `config.json` dict into a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; rewire-jax supports {', '.join(supported_model_types())}")
    return FAMILIES[model_type](hf).replace(dtype=dtype)


def load_hf_config(path: str | Path) -> dict:
    """config.json of a model directory (or the file itself) as a dict, with errors naming the file."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: a model directory needs a config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_file} holds a JSON {type(hf).__name__}, not an object: restore the model's config.json")
    return hf
