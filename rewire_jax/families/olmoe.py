"""OLMoE (HF `olmoe`): GQA attention with a flat q/k RMSNorm and optional clip_qkv, every layer a
softmax-top-k MoE (spec: shared/docs/moe-architectures.md section 2.1)."""
from __future__ import annotations

from ..config import ModelConfig, register_family, rope_from_hf, token_ids
from ..hf_io import TensorSource, decoder_params, gqa_attention, register_converter, routed_moe


@register_family("olmoe")
def parse(hf: dict) -> ModelConfig:
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


@register_converter("olmoe")
def convert(cfg: ModelConfig, src: TensorSource) -> dict:
    def layer(i: int, p: str) -> dict:
        mlp = routed_moe(src, f"{p}.mlp", cfg.num_experts)
        return {"self_attn": gqa_attention(src, f"{p}.self_attn", cfg), "mlp": mlp}
    return decoder_params(cfg, src, layer)
