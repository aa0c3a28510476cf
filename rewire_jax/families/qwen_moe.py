"""Qwen MoE families (spec: shared/docs/moe-architectures.md sections 2.2 and 2.5).

qwen2_moe (Qwen1.5-MoE): q/k/v biases; every MoE block adds a shared SwiGLU expert scaled by a
  per-token sigmoid gate (`shared_expert_gate`, [1, d], no delta: it is not one of the E logits).
qwen3_moe: no biases, no shared expert, per-head q/k RMSNorm, usually norm_topk_prob=true.
Both: softmax-top-k router; `decoder_sparse_step` / `mlp_only_layers` make some layers dense
(a plain SwiGLU of width intermediate_size, with no router and no delta row).
"""
from __future__ import annotations

from ..config import ConfigError, ModelConfig, hf_common, register_family, rope_from_hf
from ..hf_io import (TensorSource, decoder_params, dense_mlp, gqa_attention, linear, register_converter,
                     routed_moe)


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


@register_family("qwen2_moe")
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


@register_family("qwen3_moe")
def parse_qwen3(hf: dict) -> ModelConfig:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return ModelConfig(
        **_qwen_common(hf, "qwen3_moe"), qk_norm="head", attention_bias=bool(hf.get("attention_bias", False)),
        sliding_window=window, sliding_layers=tuple(range(hf["num_hidden_layers"])) if window else ())


def convert(cfg: ModelConfig, src: TensorSource) -> dict:
    def layer(i: int, p: str) -> dict:
        if cfg.moe_index(i) is None:
            mlp = dense_mlp(src, f"{p}.mlp")
        else:
            mlp = routed_moe(src, f"{p}.mlp", cfg.num_experts)
            if cfg.shared_expert_size:
                mlp["shared_expert"] = dense_mlp(src, f"{p}.mlp.shared_expert")
                mlp["shared_expert_gate"] = linear(src, f"{p}.mlp.shared_expert_gate")
        return {"self_attn": gqa_attention(src, f"{p}.self_attn", cfg), "mlp": mlp}
    return decoder_params(cfg, src, layer)


register_converter("qwen2_moe")(convert)
register_converter("qwen3_moe")(convert)
