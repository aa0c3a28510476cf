"""Op counts of the compiled decode step (rewire_jax.bench.opcount): the counter reads XLA's HLO
right, and the number of kernels a decode step runs on CPU does not grow."""
import jax
import pytest

from rewire_jax.bench import opcount
from rewire_jax.io import families
from rewire_jax.model.weights import init_params

TINY = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": 128, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256}

# Recorded on CPU (jax 0.11.x, XLA:CPU, 2026-12-02) with TINY written to tiny.json and
#   XLA_FLAGS=--xla_backend_optimization_level=0 python -m rewire_jax.bench.opcount \
#       --config tiny.json --batch 2 --cache-len 64 --dispatch DISPATCH
# (the same numbers at the default optimisation level: only LLVM's level changes). A change that
# adds kernels to the decode step fails here; one that removes some should lower these numbers.
# Lowered by the fused projections (qkv_proj, gate_up_proj; issue 19): auto 64 / 253 / 3 / 320 and
# dense 37 / 171 / 3 / 188 before (per layer 21 / 76 / 1 / 95 and 12 / 47 / 1 / 51).
RECORDED = {
    "auto": {"total": {"dots": 46, "fusions": 238, "custom_calls": 3, "kernels": 293},
             "per_layer": {"dots": 15.0, "fusions": 71.0, "custom_calls": 1.0, "kernels": 86.0}},
    "dense": {"total": {"dots": 28, "fusions": 162, "custom_calls": 3, "kernels": 179},
              "per_layer": {"dots": 9.0, "fusions": 45.0, "custom_calls": 1.0, "kernels": 49.0}},
}

HLO = """HloModule m

%fused_dot (p0: f32[2,4], p1: f32[4,4]) -> f32[2,4] {
  %p0 = f32[2,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[2,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%scan_body (t: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %t = (s32[], f32[2,4]{1,0}) parameter(0)
  %x = f32[2,4]{1,0} get-tuple-element(%t), index=1, metadata={op_name="jit(decode)/while/body/layer/attention/x"}
  %w = f32[4,4]{1,0} constant({...})
  %f = f32[2,4]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %g = f32[2,4]{1,0} custom-call(%f), custom_call_target="__cublas$gemm", metadata={op_name="jit(decode)/while/body/layer/moe/experts/ragged_dot"}
  ROOT %r = (s32[], f32[2,4]{1,0}) tuple(%i, %g)
}

%scan_cond (t: (s32[], f32[2,4])) -> pred[] {
  %t = (s32[], f32[2,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%step_body (t: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %t = (s32[], f32[2,4]{1,0}) parameter(0)
  %s = (s32[], f32[2,4]{1,0}) while(%t), condition=%scan_cond, body=%scan_body, metadata={op_name="jit(decode)/while/body/while"}, backend_config={"known_trip_count":{"n":"16"}}
  %y = f32[2,4]{1,0} get-tuple-element(%s), index=1
  %h = f32[2,4]{1,0} dot(%y, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(decode)/while/body/lm_head/dot"}
  ROOT %r = (s32[], f32[2,4]{1,0}) tuple(%i, %h)
}

%step_cond (t: (s32[], f32[2,4])) -> pred[] {
  %t = (s32[], f32[2,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[2,4]) -> (s32[], f32[2,4]) {
  %a = f32[2,4]{1,0} parameter(0)
  %pre = f32[2,4]{1,0} fusion(%a, %a), kind=kLoop, calls=%fused_dot
  %t = (s32[], f32[2,4]{1,0}) tuple(%i, %pre)
  ROOT %loop = (s32[], f32[2,4]{1,0}) while(%t), condition=%step_cond, body=%step_body, metadata={op_name="jit(decode)/while"}
}
"""


def test_counter_weights_nested_loops_and_attributes_layers():
    """A hand-written program: a 16-trip layer scan inside the decode loop; the fusion outside the
    loop is not part of a step; the fused dot without metadata takes its operand's layer scope."""
    c = opcount.count_step(HLO, num_layers=16)
    assert c["layers"] == {"dots": 16, "fusions": 16, "custom_calls": 16, "kernels": 32}
    assert c["per_layer"] == {"dots": 1.0, "fusions": 1.0, "custom_calls": 1.0, "kernels": 2.0}
    assert c["other"] == {"dots": 1, "fusions": 0, "custom_calls": 0, "kernels": 1}
    assert c["custom_call_targets"] == {"__cublas$gemm": 16}
    assert c["routed_experts"] == {"custom-call __cublas$gemm": 16}
    with pytest.raises(ValueError, match="ENTRY"):
        opcount.count_step("HloModule m\n", 1)


@pytest.mark.parametrize("dispatch", sorted(RECORDED))
def test_decode_step_op_counts_do_not_grow(dispatch):
    cfg = families.from_hf(TINY)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    got = opcount.decode_step_counts(params, cfg, batch=2, cache_len=64, dispatch=dispatch)
    if jax.default_backend() != "cpu":
        pytest.skip("the recorded counts are XLA:CPU's")
    # sanity: the counter sees every layer's projections (q/k/v/o or fused qkv + o, router, experts)
    # and the LM head outside the layers
    assert got["per_layer"]["dots"] >= 3 and got["other"]["dots"] >= 1, got
    assert got["routed_experts"], got
    assert got["total"]["dots"] == got["layers"]["dots"] + got["other"]["dots"]
    for part in ("total", "per_layer"):
        for k, v in RECORDED[dispatch][part].items():
            assert got[part][k] <= v, (f"{dispatch}: the decode step's {part} {k} grew from {v} to {got[part][k]} "
                                       f"(counts: {got})")
