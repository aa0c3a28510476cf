"""DeepSeek-V2 / V2-Lite (HF `deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`), spec sections 2.3, 2.7.

MLA attention (rewire_jax.attention.MLAttention) with interleaved RoPE on the qk_rope_head_dim
slice and YaRN with mscale (softmax scale 0.1147 for V2-Lite); the first `first_k_dense_replace`
layers are dense (no router, no delta row); MoE layers add ungated shared experts of width
moe_intermediate_size * n_shared_experts.
Routers (all fp32): V2 `greedy` = softmax-top-k, `group_limited_greedy` = groups by max p (the delta
moves the group choice too), both times routed_scaling_factor and never renormalised (V2 has no
norm_topk_prob branch); V3 `noaux_tc` = sigmoid scores + e_score_correction_bias for the choice,
groups by top-2 sums, weights = sigmoid at the chosen experts (renormalised if norm_topk_prob).
"""
from __future__ import annotations

import re

from ..config import (ConfigError, MLAConfig, ModelConfig, RouterConfig, hf_common, register_family,
                      rope_from_hf)
from ..hf_io import TensorSource, decoder_params, dense_mlp, linear, norm, register_converter, routed_moe

V2_TOPK_METHODS = {"greedy": "softmax_topk", "group_limited_greedy": "group_limited"}


def _common(hf: dict, model_type: str, router: RouterConfig, norm_topk_prob: bool,
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


@register_family("deepseek_v2")
def parse_v2(hf: dict) -> ModelConfig:
    method = hf.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise ConfigError(f"deepseek_v2 topk_method {method!r} is not supported; transformers implements "
                          f"{', '.join(V2_TOPK_METHODS)}")
    router = RouterConfig(kind=V2_TOPK_METHODS[method], n_group=hf.get("n_group") or 1,
                          topk_group=hf.get("topk_group") or 1,
                          routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    return _common(hf, "deepseek_v2", router, norm_topk_prob=False, rope_interleave=True)


@register_family("deepseek_v3")
def parse_v3(hf: dict) -> ModelConfig:
    router = RouterConfig(kind="sigmoid_group", n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                          routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)))
    return _common(hf, "deepseek_v3", router, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   rope_interleave=bool(hf.get("rope_interleave", True)))


def mla_attention(src: TensorSource, prefix: str, cfg: ModelConfig) -> dict:
    b = cfg.attention_bias
    attn = {"kv_a_proj_with_mqa": linear(src, f"{prefix}.kv_a_proj_with_mqa", b),
            "kv_a_layernorm": norm(src, f"{prefix}.kv_a_layernorm"),
            "kv_b_proj": linear(src, f"{prefix}.kv_b_proj"),
            "o_proj": linear(src, f"{prefix}.o_proj", b)}
    if cfg.mla.q_lora_rank is None:
        attn["q_proj"] = linear(src, f"{prefix}.q_proj")
    else:
        attn.update(q_a_proj=linear(src, f"{prefix}.q_a_proj", b),
                    q_a_layernorm=norm(src, f"{prefix}.q_a_layernorm"),
                    q_b_proj=linear(src, f"{prefix}.q_b_proj"))
    return attn


def convert(cfg: ModelConfig, src: TensorSource) -> dict:
    def layer(i: int, p: str) -> dict:
        if cfg.moe_index(i) is None:
            mlp = dense_mlp(src, f"{p}.mlp")
        else:
            mlp = routed_moe(src, f"{p}.mlp", cfg.num_experts)
            if cfg.router.kind == "sigmoid_group":
                mlp["e_score_correction_bias"] = src.take(f"{p}.mlp.gate.e_score_correction_bias")
            if cfg.shared_expert_size:
                mlp["shared_expert"] = dense_mlp(src, f"{p}.mlp.shared_experts")
        return {"self_attn": mla_attention(src, f"{p}.self_attn", cfg), "mlp": mlp}

    if cfg.model_type == "deepseek_v3":
        # V3 checkpoints carry multi-token-prediction layers after the last decoder layer; HF drops them
        extra = re.compile(r"model\.layers\.(\d+)\.")
        src.skip(lambda k: bool((m := extra.match(k))) and int(m.group(1)) >= cfg.num_layers)
    return decoder_params(cfg, src, layer)


register_converter("deepseek_v2")(convert)
register_converter("deepseek_v3")(convert)
