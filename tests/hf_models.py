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
    return model


def prompt(n: int = 12, seed: int = 1, vocab: int = 128, avoid=(0, 1, 2)) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=4 * n)
    return [int(t) for t in ids if t not in avoid][:n]
