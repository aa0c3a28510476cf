"""Every seed architecture beyond OLMoE against transformers 5.23 (fp32, tiny random models):
Qwen1.5-MoE (qwen2_moe), Qwen3-MoE, Mixtral, DeepSeek-V2-Lite / V2 (group-limited, q_lora),
DeepSeek-V3 (sigmoid router) and gpt-oss; MXFP4 checkpoints; real-size configs without weights.

Compile time dominates, so the shapes are shared on purpose: every model-running test uses batch 2
and 16 positions (forward [2, 16]; generate: 16-row cache, 5-token decode segments), which lets the
parity, decode and oracle tests of one architecture reuse the same compiled programs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import hf_models
import rewire_jax
from rewire_jax import RewireOptions, config as config_lib, hf_io
from rewire_jax.model import layer_params
from rewire_jax.attention import mla_softmax_scale
from rewire_jax.config import ConfigError
from rewire_jax.layers import rope_inv_freq
from rewire_jax.model import param_shapes
from rewire_jax.bench.torch_reference import hf_logits, reference_generate

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2_lite", "deepseek_v2_glg", "deepseek_v3", "gpt_oss"]
MOE_LAYERS = {"qwen2_moe": (0, 2), "deepseek_v2_lite": (1, 2), "deepseek_v2_glg": (1, 2), "deepseek_v3": (1, 2)}
FIXTURES = Path(__file__).parent / "fixtures"
T = 16


def random_delta(model, seed=1):
    return np.random.default_rng(seed).normal(0, 1.0, model.config.delta_shape).astype(np.float32)


# -- logits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_logit_parity(loaded, name):
    tm, model = loaded(name)
    cfg = model.config
    assert cfg.moe_layers == MOE_LAYERS.get(name, tuple(range(cfg.num_layers)))
    assert cfg.delta_shape == (len(cfg.moe_layers), cfg.num_experts)  # dense layers: no delta row
    ids = np.random.default_rng(0).integers(3, 128, (2, T))
    ref = hf_logits(tm, ids)
    out = np.asarray(model(ids))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()
    delta = random_delta(model)
    ref_d = hf_logits(tm, ids, delta)
    assert np.abs(ref_d - ref).max() > 1e-2  # the delta really moves the logits
    # per-sequence deltas [B, L_moe, E]: row 0 with delta, row 1 with -delta
    out_b = np.asarray(model(ids, np.stack([delta, -delta])))
    assert np.abs(out_b[0] - ref_d[0]).max() <= 1e-4, np.abs(out_b[0] - ref_d[0]).max()
    ref_neg = hf_logits(tm, ids[1:], -delta)[0]
    assert np.abs(out_b[1] - ref_neg).max() <= 1e-4, np.abs(out_b[1] - ref_neg).max()


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_fused_state_dict_layout(hf_dirs, loaded, name, tmp_path):
    """A raw state_dict() save (Mixtral: mlp.* instead of block_sparse_moe.*, fused gate_up_proj)."""
    tm, d = hf_dirs(name)
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ids = np.random.default_rng(0).integers(3, 128, (2, T))
    assert np.abs(np.asarray(rewire_jax.load(tmp_path)(ids)) - hf_logits(tm, ids)).max() <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_sliding_window_is_active(hf_dirs, name):
    """The compared sequences are longer than the window, so the window changes the HF logits."""
    tm, _ = hf_dirs(name)
    ids = np.random.default_rng(0).integers(3, 128, (1, T))
    cls, model_cls, kw = hf_models.VARIANTS[name]
    full = getattr(transformers, model_cls)(getattr(transformers, cls)(
        **{**hf_models.BASE, **kw, "sliding_window": 4 * T})).eval()
    full.load_state_dict(tm.state_dict())
    assert np.abs(hf_logits(full, ids) - hf_logits(tm, ids)).max() > 1e-3


def test_group_limited_routing_differs_from_greedy(hf_dirs):
    """On the compared inputs the group limit changes some choices, so parity checks it."""
    tm, _ = hf_dirs("deepseek_v2_glg")
    with torch.no_grad():
        z = tm(torch.tensor(np.random.default_rng(0).integers(3, 128, (2, T))),
               output_router_logits=True).router_logits
    p = torch.softmax(torch.stack(z), -1)                       # [L, N, E]
    greedy = set(map(tuple, torch.topk(p, 3, -1).indices.sort(-1).values.reshape(-1, 3).tolist()))
    groups = p.reshape(*p.shape[:-1], 4, 2).amax(-1)
    keep = torch.zeros_like(groups).scatter_(-1, torch.topk(groups, 2, -1).indices, 1).repeat_interleave(2, -1)
    limited = set(map(tuple, torch.topk(p * keep, 3, -1).indices.sort(-1).values.reshape(-1, 3).tolist()))
    assert greedy != limited


# -- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_decode_matches_teacher_forcing_and_hf_generate(loaded, name):
    tm, model = loaded(name)
    prompt = hf_models.prompt(11)  # 11 + 5 = 16 positions: beyond every sliding window in VARIANTS
    deltas = np.stack([np.zeros(model.config.delta_shape, np.float32), random_delta(model, 3)])
    out = rewire_jax.generate(model, [prompt, prompt], 5, deltas=deltas, eos_token_id=None).tokens
    assert out == hf_models.teacher_forced_rollout(model, prompt, 5, deltas)
    with torch.no_grad():
        ref = tm.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                          pad_token_id=1)[0, len(prompt):].tolist()
    assert out[0] == ref


# -- the rewiring cycle against the PyTorch oracle -------------------------------------------------

ORACLE_OPTS = {
    "qwen2_moe": [dict(), dict(selection="hard", confidence="inverse")],
    "qwen3_moe": [dict(), dict(soft_mode="grad", loss="sum", lr=0.02)],
    "mixtral": [dict(), dict(selection="all", persist_optimizer=False)],
    "deepseek_v2_lite": [dict(), dict(selection="reverse", ratio=0.5)],
    "deepseek_v2_glg": [dict(), dict(selection="hard", confidence="inverse", lr=0.2)],
    "deepseek_v3": [dict(), dict(selection="hard", steps=3, lr=0.2)],
    "gpt_oss": [dict(), dict(confidence="inverse", lr=0.2)],
}


@pytest.mark.parametrize("name,opts", [(n, o) for n in ARCHS for o in ORACLE_OPTS[n]],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_rewiring_matches_torch_reference(loaded, name, opts):
    """Two prompts in one batch, each against the oracle alone: two phases (contexts 6 and 11)."""
    tm, model = loaded(name)
    prompts = [hf_models.prompt(6, seed=1), hf_models.prompt(6, seed=2)]
    out = rewire_jax.generate(model, prompts, 10, rewire=RewireOptions(interval=5, **opts), eos_token_id=None)
    for row, prompt in enumerate(prompts):
        ref = reference_generate(tm, prompt, 10, interval=5, eos_token_id=None, **opts)
        assert out.tokens[row] == ref["tokens"]
        assert np.abs(out.deltas[row] - ref["deltas"]).max() <= 1e-4
        assert np.abs(ref["deltas"]).max() > 1e-2
        phases = out.phase_dicts(row)
        assert [p["context_len"] for p in phases] == [r["context_len"] for r in ref["phases"]] == [6, 11]
        for r, p in zip(ref["phases"], phases):
            assert abs(p["loss_before"] - r["loss_before"]) <= 1e-4 * max(1, abs(r["loss_before"]))
            assert abs(p["loss_after"] - r["loss_after"]) <= 1e-4 * max(1, abs(r["loss_after"]))
            np.testing.assert_allclose(p["scores"], r["scores"], rtol=1e-4)
            np.testing.assert_allclose(p["weights"], r["weights"], atol=1e-5)


# -- MXFP4 ---------------------------------------------------------------------------------------

def test_mxfp4_checkpoint_loads_exactly(hf_dirs, loaded, tmp_path):
    tm, d = hf_dirs("gpt_oss")
    tensors = hf_models.mxfp4_state_dict(tm)   # the hub stores the experts as [E, out, in/32, 16]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    hf_q = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ours = rewire_jax.load(tmp_path)
    # bit-exact dequantization (gate = even columns of HF's input-major gate_up_proj)
    for i in range(cfg["num_hidden_layers"]):
        hf_exp, mlp = hf_q.model.layers[i].mlp.experts, layer_params(ours.params, ours.config, i)["mlp"]
        inter = mlp["down_proj"].shape[-2]   # ours: gate_up_proj [E, d, 2I] = gate | up (halves)
        assert np.array_equal(hf_exp.gate_up_proj.detach().numpy()[..., 0::2], np.asarray(mlp["gate_up_proj"])[..., :inter])
        assert np.array_equal(hf_exp.gate_up_proj.detach().numpy()[..., 1::2], np.asarray(mlp["gate_up_proj"])[..., inter:])
        assert np.array_equal(hf_exp.down_proj.detach().numpy(), np.asarray(mlp["down_proj"]))
    ids = np.random.default_rng(0).integers(3, 128, (2, T))
    ref = hf_logits(hf_q, ids)
    assert np.abs(np.asarray(ours(ids)) - ref).max() <= 1e-4
    assert np.abs(ref - hf_logits(tm, ids)).max() > 1e-2  # quantization really changed the model
    delta = random_delta(ours)
    assert np.abs(np.asarray(ours(ids, delta)) - hf_logits(hf_q, ids, delta)).max() <= 1e-4


# -- released checkpoints: configs and key names without weights -----------------------------------

REAL = {  # fixture -> published parameter count
    "olmoe-1b-7b-0924": 6.9e9,
    "qwen1.5-moe-a2.7b": 14.3e9,
    "deepseek-v2-lite": 15.7e9,
    "gpt-oss-20b": 20.9e9,
}


def real_config(name) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def hub_index(hf: dict) -> dict[str, tuple[tuple, str]]:
    """Key names, shapes and dtypes of the released safetensors, written from the model cards /
    spec section 2 (not from our converter): {key: (shape, dtype)}."""
    mt, d, V, L = hf["model_type"], hf["hidden_size"], hf["vocab_size"], hf["num_hidden_layers"]
    bf = "bfloat16"
    keys = {"model.embed_tokens.weight": ((V, d), bf), "model.norm.weight": ((d,), bf),
            "lm_head.weight": ((V, d), bf)}

    def add(prefix, **shapes):  # q_proj__weight=(out, in) -> "{prefix}.q_proj.weight"; (shape, dtype) or shape
        for k, v in shapes.items():
            shape, dtype = v if isinstance(v[-1], str) else (v, bf)
            keys[f"{prefix}.{k.replace('__', '.')}"] = (tuple(shape), dtype)

    def swiglu_experts(p, E, inter, names=("gate_proj", "up_proj", "down_proj")):
        for e in range(E):
            add(f"{p}.{e}", **{f"{names[0]}__weight": (inter, d), f"{names[1]}__weight": (inter, d),
                                f"{names[2]}__weight": (d, inter)})

    H = hf["num_attention_heads"]
    for i in range(L):
        p = f"model.layers.{i}"
        add(p, input_layernorm__weight=(d,), post_attention_layernorm__weight=(d,))
        if mt == "olmoe":
            D = d // H
            add(f"{p}.self_attn", q_proj__weight=(d, d), k_proj__weight=(d, d), v_proj__weight=(d, d),
                o_proj__weight=(d, d), q_norm__weight=(d,), k_norm__weight=(H * D,))
            add(f"{p}.mlp", gate__weight=(hf["num_experts"], d))
            swiglu_experts(f"{p}.mlp.experts", hf["num_experts"], hf["intermediate_size"])
        elif mt == "qwen2_moe":
            add(f"{p}.self_attn", q_proj__weight=(d, d), q_proj__bias=(d,), k_proj__weight=(d, d),
                k_proj__bias=(d,), v_proj__weight=(d, d), v_proj__bias=(d,), o_proj__weight=(d, d))
            S, E = hf["shared_expert_intermediate_size"], hf["num_experts"]
            add(f"{p}.mlp", gate__weight=(E, d), shared_expert_gate__weight=(1, d))
            add(f"{p}.mlp.shared_expert", gate_proj__weight=(S, d), up_proj__weight=(S, d), down_proj__weight=(d, S))
            swiglu_experts(f"{p}.mlp.experts", E, hf["moe_intermediate_size"])
        elif mt == "deepseek_v2":
            r, nope, rope, dv = hf["kv_lora_rank"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
            add(f"{p}.self_attn", q_proj__weight=(H * (nope + rope), d), kv_a_proj_with_mqa__weight=(r + rope, d),
                kv_a_layernorm__weight=(r,), kv_b_proj__weight=(H * (nope + dv), r), o_proj__weight=(d, H * dv))
            if i < hf["first_k_dense_replace"]:
                I = hf["intermediate_size"]
                add(f"{p}.mlp", gate_proj__weight=(I, d), up_proj__weight=(I, d), down_proj__weight=(d, I))
            else:
                E, I = hf["n_routed_experts"], hf["moe_intermediate_size"]
                S = I * hf["n_shared_experts"]
                add(f"{p}.mlp", gate__weight=(E, d))
                add(f"{p}.mlp.shared_experts", gate_proj__weight=(S, d), up_proj__weight=(S, d),
                    down_proj__weight=(d, S))
                swiglu_experts(f"{p}.mlp.experts", E, I)
        elif mt == "gpt_oss":
            D, KV, E, I = hf["head_dim"], hf["num_key_value_heads"], hf["num_local_experts"], hf["intermediate_size"]
            add(f"{p}.self_attn", q_proj__weight=(H * D, d), q_proj__bias=(H * D,), k_proj__weight=(KV * D, d),
                k_proj__bias=(KV * D,), v_proj__weight=(KV * D, d), v_proj__bias=(KV * D,),
                o_proj__weight=(d, H * D), o_proj__bias=(d,), sinks=(H,))
            add(f"{p}.mlp", router__weight=(E, d), router__bias=(E,))
            add(f"{p}.mlp.experts",
                gate_up_proj_blocks=((E, 2 * I, d // 32, 16), "uint8"), gate_up_proj_scales=((E, 2 * I, d // 32), "uint8"),
                gate_up_proj_bias=(E, 2 * I),
                down_proj_blocks=((E, d, I // 32, 16), "uint8"), down_proj_scales=((E, d, I // 32), "uint8"),
                down_proj_bias=(E, d))
    return keys


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_param_count_and_key_index(name):
    hf = real_config(name)
    cfg = config_lib.from_hf(hf)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(cfg)))
    assert abs(count - REAL[name]) <= 0.01 * REAL[name], (name, count)
    index = hub_index(hf)
    tree = hf_io.lazy_params(cfg, hf_io.TensorSource.from_shapes(index))  # no missing / unexpected keys
    assert tree
    missing = dict(index)
    dropped = sorted(missing)[len(missing) // 2]
    del missing[dropped]
    with pytest.raises(hf_io.CheckpointError, match="missing key"):
        hf_io.lazy_params(cfg, hf_io.TensorSource.from_shapes(missing))
    extra = {**index, "model.layers.0.mlp.surprise.weight": ((3,), "bfloat16")}
    with pytest.raises(hf_io.CheckpointError, match="unexpected keys.*surprise"):
        hf_io.lazy_params(cfg, hf_io.TensorSource.from_shapes(extra))


def test_real_config_details():
    lite = config_lib.from_hf(real_config("deepseek-v2-lite"))
    assert lite.moe_layers == tuple(range(1, 27)) and lite.delta_shape == (26, 64)
    assert lite.shared_expert_size == 2816 and lite.router.kind == "softmax_topk"
    assert abs(mla_softmax_scale(lite.rope, lite.mla.qk_head_dim) - 0.1147213868) < 1e-9
    oss = config_lib.from_hf(real_config("gpt-oss-20b"))
    assert oss.sliding_layers == tuple(range(0, 24, 2)) and oss.sliding_window == 128
    assert oss.rope.rope_type == "yarn" and not oss.rope.truncate
    qwen = config_lib.from_hf(real_config("qwen1.5-moe-a2.7b"))
    assert qwen.attention_bias and qwen.shared_expert_gate and qwen.sliding_window is None
    # YaRN inv_freq and attention factor exactly as transformers computes them for the real configs
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name, ours in (("deepseek-v2-lite", lite), ("gpt-oss-20b", oss)):
        hf_cfg = transformers.AutoConfig.for_model(**real_config(name))
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        freq, factor = rope_inv_freq(ours.rope, ours.rope.dim or ours.head_dim)
        assert np.array_equal(freq, ref_freq.numpy()) and abs(factor - ref_factor) < 1e-12
    assert abs(rope_inv_freq(oss.rope, 64)[1] - 1.3465735902799727) < 1e-12
    # converted checkpoints store the config as JSON: nested MLA / router settings survive
    for cfg in (lite, oss, qwen):
        assert config_lib.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_qwen_sparse_step_and_dense_layers():
    base = real_config("qwen1.5-moe-a2.7b")
    cfg = config_lib.from_hf({**base, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.moe_layers == (1, 5) and cfg.delta_shape == (2, 60) and cfg.moe_index(3) is None
    with pytest.raises(ConfigError, match="no MoE layer"):
        config_lib.from_hf({**base, "mlp_only_layers": list(range(24))})


def test_unsupported_variants_fail_clearly():
    lite = real_config("deepseek-v2-lite")
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc' is not supported"):
        config_lib.from_hf({**lite, "topk_method": "noaux_tc"})
    with pytest.raises(ConfigError, match="n_group=3 must divide num_experts=64"):
        config_lib.from_hf({**lite, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1})
    oss = real_config("gpt-oss-20b")
    with pytest.raises(ConfigError, match="quantization 'bitsandbytes' is not supported"):
        config_lib.from_hf({**oss, "quantization_config": {"quant_method": "bitsandbytes"}})


def test_deepseek_v3_mtp_layer_keys_are_ignored(hf_dirs):
    """V3 hub checkpoints carry an extra multi-token-prediction layer that HF drops on load."""
    tm, d = hf_dirs("deepseek_v3")
    cfg = config_lib.from_hf(json.loads((d / "config.json").read_text()))
    index = {k: (tuple(v.shape), "float32") for k, v in tm.state_dict().items()}
    for k in [k for k in index if k.startswith("model.layers.2.")]:
        index[k.replace("model.layers.2.", f"model.layers.{cfg.num_layers}.")] = index[k]
    assert hf_io.lazy_params(cfg, hf_io.TensorSource.from_shapes(index))
