"""The benchmarks' model: an OLMoE-shaped HF model with random weights, built locally (no download),
and its HF config dict (for programs built from the config alone)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    experts: int = 32
    top_k: int = 4
    intermediate: int = 256
    vocab: int = 8192
    init_std: float = 0.02


#: OLMoE-1B-7B-0924's config.json (the hub's, abridged): the accelerator profile's and the memory
#: benchmark's model shape
OLMOE_1B_7B = {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "clip_qkv": None,
               "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
               "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe",
               "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
               "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 1, "rope_theta": 10000.0,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 50304}

#: A tiny shape of the same architecture: the accelerator profile's CI run on CPU (seconds per compile)
TINY = Shape(hidden=64, layers=2, heads=4, experts=8, top_k=2, intermediate=32, vocab=256)


def hf_config(shape: Shape) -> dict:
    """The HF `config.json` dict of `shape` (OLMoE architecture; no special token ids)."""
    return {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": shape.vocab,
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads, "num_experts": shape.experts,
            "num_experts_per_tok": shape.top_k, "max_position_embeddings": 8192, "initializer_range": shape.init_std,
            "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}


def build_hf(shape: Shape, seed: int = 0):
    import torch
    import transformers
    torch.manual_seed(seed)
    kw = {k: v for k, v in hf_config(shape).items() if k not in ("model_type", "architectures")}
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**kw)).to(torch.float32).eval()


#: named shapes of the profiles (bench.accelerator, bench.opcount): OLMoE-1B-7B-0924's config, the
#: CPU benchmark model, the tiny CI shape
SHAPES = ("olmoe-1b-7b", "bench", "tiny")


def shape_config(name: str, layers=None) -> dict:
    """The HF config dict of a named shape (SHAPES), with `layers` decoder layers if given."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    hf = dict(OLMOE_1B_7B) if name == "olmoe-1b-7b" else hf_config(TINY if name == "tiny" else Shape())
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return hf
