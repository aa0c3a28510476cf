"""Mixtral (HF `mixtral`, spec section 2.6): plain GQA with rotate-half RoPE and an optional sliding
window on every layer; softmax-top-k router that always renormalises over the k chosen experts.

Hub / save_pretrained files keep the legacy names `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1|w3|w2` (gate|up|down); a raw state_dict() uses `mlp.gate` and the
fused `mlp.experts.gate_up_proj` / `down_proj`. Both are accepted.
"""
from __future__ import annotations

from ..config import ModelConfig, hf_common, register_family, rope_from_hf
from ..hf_io import TensorSource, decoder_params, gqa_attention, register_converter, routed_moe


@register_family("mixtral")
def parse(hf: dict) -> ModelConfig:
    window = hf.get("sliding_window")
    return ModelConfig(
        **hf_common(hf, "mixtral", eps_default=1e-5),
        num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf["intermediate_size"], moe_layers=tuple(range(hf["num_hidden_layers"])),
        norm_topk_prob=True, rope=rope_from_hf(hf),
        sliding_window=window or None, sliding_layers=tuple(range(hf["num_hidden_layers"])) if window else ())


@register_converter("mixtral")
def convert(cfg: ModelConfig, src: TensorSource) -> dict:
    def layer(i: int, p: str) -> dict:
        moe = f"{p}.block_sparse_moe" if src.has(f"{p}.block_sparse_moe.gate.weight") else f"{p}.mlp"
        mlp = routed_moe(src, moe, cfg.num_experts, names=("w1", "w3", "w2"))
        return {"self_attn": gqa_attention(src, f"{p}.self_attn", cfg), "mlp": mlp}
    return decoder_params(cfg, src, layer)
