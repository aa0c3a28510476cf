"""The batch table's decode roofline: bytes a decode step must read, counted independently."""
import numpy as np

import rewire_jax
from rewire_jax.bench import batch
from rewire_jax.cli import DEMO_MODEL


def test_decode_step_bytes_of_the_demo_model():
    model = rewire_jax.load(DEMO_MODEL)
    c = model.config
    f32 = 4
    # KV: K and V of every layer, kv_heads x head_dim each, per token per row
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * f32
    assert batch.kv_bytes_per_token(model) == kv_per_token
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * f32         # gate, up, down of one expert
    total = sum(np.asarray(x).nbytes for x in __import__("jax").tree.leaves(model.params))
    embed = c.vocab_size * c.hidden_size * f32
    all_experts = c.num_experts * c.num_moe_layers * per_expert
    for distinct, ctx, B in ((2, 100, 1), (16, 250.5, 16)):
        got = batch.decode_step_bytes(model, distinct, ctx, B)
        assert got["kv"] == B * ctx * kv_per_token
        assert got["weights"] == total - embed - all_experts + distinct * c.num_moe_layers * per_expert
        assert got["total"] == got["weights"] + got["kv"]


def test_roofline_ratio():
    result = {"bandwidth": 10e9, "rows": [{"batch": 1, "step_bytes": {"total": 1e7}},
                                          {"batch": 16, "step_bytes": {"total": 4e7}}]}
    batch.roofline(result)
    assert [r["roofline_decode_tok_s"] for r in result["rows"]] == [1000.0, 4000.0]
