"""Tiny random HF MoE models, built and saved locally (no hub): the oracles of the test-suite.

Each variant is a (transformers config class name, kwargs). Weights use initializer_range 0.1 and
random (non-unit) norm weights so that routing is decisive and every parameter matters.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, initializer_range=0.1)

VARIANTS: dict[str, tuple[str, str, dict]] = {
    # name: (config class, model class, kwargs)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                   eos_token_id=2, pad_token_id=1)),
    "olmoe_gqa_clip_norm": ("OlmoeConfig", "OlmoeForCausalLM",
                            dict(intermediate_size=32, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                 clip_qkv=0.4, norm_topk_prob=True, eos_token_id=2, pad_token_id=1)),
    "olmoe_tied": ("OlmoeConfig", "OlmoeForCausalLM",
                   dict(intermediate_size=32, num_key_value_heads=1, num_experts=6, num_experts_per_tok=2,
                        tie_word_embeddings=True, eos_token_id=2, pad_token_id=1)),
    # Qwen1.5-MoE: q/k/v bias, gated shared expert; layer 1 dense (mlp_only_layers) has no delta row
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                       eos_token_id=2, pad_token_id=1)),
    # Qwen3-MoE: per-head q/k norm, head_dim 32 != hidden / heads, norm_topk_prob
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, head_dim=32,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=2, pad_token_id=1,
                       num_hidden_layers=2)),
    # Mixtral with a sliding window on every layer (prompts in the tests are longer than 6)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                     sliding_window=6, eos_token_id=2, pad_token_id=1, bos_token_id=0, num_hidden_layers=2)),
    # DeepSeek-V2-Lite shape: plain q_proj, greedy router, YaRN with mscale, dense layer 0
    "deepseek_v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                         dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                              num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              topk_method="greedy", n_group=1, topk_group=1, eos_token_id=2, pad_token_id=1,
                              bos_token_id=0,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0,
                                               "mscale": 0.707, "mscale_all_dim": 0.707,
                                               "original_max_position_embeddings": 64, "beta_fast": 32,
                                               "beta_slow": 1})),
    # DeepSeek-V2 (full) shape: q_lora, group_limited_greedy (4 groups of 2, keep 2), scaling factor
    "deepseek_v2_glg": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                             n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                             topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                             eos_token_id=2, pad_token_id=1, bos_token_id=0)),
    # DeepSeek-V3: sigmoid noaux_tc router with correction bias, q_lora, de-interleaved rope output
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                         qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, eos_token_id=2, pad_token_id=1, bos_token_id=0)),
    # gpt-oss: sinks, sliding window 4 on layer 0 and full attention on layer 1, biases everywhere,
    # YaRN (the GptOssConfig default: no truncation, attention factor on cos/sin)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=4, eos_token_id=2, pad_token_id=1, bos_token_id=0,
                     num_hidden_layers=2)),
}


def build(name: str, seed: int = 0):
    cfg_cls, model_cls, kw = VARIANTS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **kw})
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "sinks" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, buf in model.named_buffers():  # DeepSeek-V3's e_score_correction_bias
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def prompt(n: int = 12, seed: int = 1, vocab: int = 128, avoid=(0, 1, 2)) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=4 * n)
    return [int(t) for t in ids if t not in avoid][:n]


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest MXFP4, written from the OCP MX spec: w [E, out, in] -> blocks uint8
    [E, out, in/32, 16] (low nibble = even element), scales uint8 [E, out, in/32] (E8M0, bias 127).
    Each 32-block gets the smallest power-of-two scale that brings its max |w| within FP4's 6."""
    from rewire_jax.io.mxfp4 import FP4_VALUES
    E, R, K = w.shape
    groups = w.reshape(E, R, K // 32, 32).astype(np.float64)
    amax = np.abs(groups).max(-1)
    exp = np.clip(np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127, 127).astype(np.int32)
    scaled = groups / np.ldexp(1.0, exp)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES.astype(np.float64)).argmin(-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(exp + 127, np.uint8)


def mxfp4_state_dict(model) -> dict:
    """A gpt-oss model's tensors in the hub's MXFP4 layout: the experts' gate_up_proj / down_proj
    (in memory [E, in, out], input-major) as `_blocks` / `_scales` [E, out, in/32, 16] / [E, out, in/32]."""
    tensors = {}
    for key, value in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(value.numpy().transpose(0, 2, 1))
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
        else:
            tensors[key] = value.contiguous()
    return tensors


def teacher_forced_rollout(model, prompt, n, deltas=None):
    """Greedy rollout by full forwards over one fixed [B, len(prompt) + n] right-padded buffer (causal:
    the padding after position t cannot affect position t), so one compiled forward, not one per
    length. deltas: None or [L_moe, E] (one row), or [B, L_moe, E] (one row per delta).
    -> B lists of n tokens."""
    B = 1 if deltas is None or np.ndim(deltas) == 2 else len(deltas)
    buf = np.zeros((B, len(prompt) + n), np.int32)
    buf[:, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buf[:, t] = np.argmax(np.asarray(model(buf, deltas))[:, t - 1], axis=-1)
    return buf[:, len(prompt):].tolist()
