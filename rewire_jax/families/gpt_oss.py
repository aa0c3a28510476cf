"""gpt-oss (HF `gpt_oss`, spec section 2.4).

Attention: GQA with q/k/v/o biases, one learned sink logit per head in the softmax denominator,
sliding-window layers (`layer_types`) alternating with full ones, YaRN without truncation (the
attention factor scales cos and sin). Router: x W + b (+ delta), top-k of those logits, softmax over
the k. Experts: clamped SwiGLU with biases; on disk gate and up are interleaved (even/odd rows).

Expert weights come either MXFP4-quantized (`*_blocks` / `*_scales`, [E, out, in/32, 16], the hub
format; dequantized exactly by rewire_jax.mxfp4) or unquantized in the fused input-major layout
(`gate_up_proj` [E, d, 2I], `down_proj` [E, I, d], as transformers 5 saves a dequantized model).
"""
from __future__ import annotations

from .. import mxfp4
from ..config import ConfigError, ModelConfig, RouterConfig, hf_common, register_family, rope_from_hf
from ..hf_io import (CheckpointError, Lazy, TensorSource, decoder_params, gqa_attention, linear,
                     register_converter, take_slice, transpose)
from ..moe import GPTOSS_ALPHA

DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}


@register_family("gpt_oss")
def parse(hf: dict) -> ModelConfig:
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


def dequantized(src: TensorSource, prefix: str) -> Lazy:
    """`{prefix}_blocks` + `{prefix}_scales` -> float32 [E, out, in] (lazy, exact)."""
    blocks, scales = src.take(f"{prefix}_blocks"), src.take(f"{prefix}_scales")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise CheckpointError(f"MXFP4 {blocks.origin} {blocks.shape} and {scales.origin} {scales.shape} "
                              "do not pair up ([E, out, G, 16] and [E, out, G])")
    shape = blocks.shape[:-2] + (blocks.shape[-2] * 32,)
    return Lazy(shape, "float32", lambda: mxfp4.dequantize(blocks.load(), scales.load()), blocks.origin)


def experts(src: TensorSource, prefix: str) -> dict:
    """-> {'gate_proj' [E, d, I], 'up_proj' [E, d, I], 'down_proj' [E, I, d], biases}."""
    if src.has(f"{prefix}.gate_up_proj_blocks"):
        gate_up = transpose(dequantized(src, f"{prefix}.gate_up_proj"), (0, 2, 1))  # [E, 2I, d] -> [E, d, 2I]
        down = transpose(dequantized(src, f"{prefix}.down_proj"), (0, 2, 1))        # [E, d, I] -> [E, I, d]
    else:
        gate_up, down = src.take(f"{prefix}.gate_up_proj"), src.take(f"{prefix}.down_proj")
    two_i = gate_up.shape[-1]
    gu_bias = src.take(f"{prefix}.gate_up_proj_bias")
    return {"gate_proj": take_slice(gate_up, 2, 0, two_i, 2), "up_proj": take_slice(gate_up, 2, 1, two_i, 2),
            "down_proj": down,
            "gate_bias": take_slice(gu_bias, 1, 0, two_i, 2), "up_bias": take_slice(gu_bias, 1, 1, two_i, 2),
            "down_bias": src.take(f"{prefix}.down_proj_bias")}


@register_converter("gpt_oss")
def convert(cfg: ModelConfig, src: TensorSource) -> dict:
    def layer(i: int, p: str) -> dict:
        mlp = {"gate": linear(src, f"{p}.mlp.router", bias=True), **experts(src, f"{p}.mlp.experts")}
        return {"self_attn": gqa_attention(src, f"{p}.self_attn", cfg), "mlp": mlp}
    return decoder_params(cfg, src, layer)
