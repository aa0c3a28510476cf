"""Quick self-checks of the PyTorch oracle (tests/torch_reference.py) on a tiny random OLMoE."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from rewire_jax.bench.torch_reference import deltas_injected, reference_generate, router_modules  # noqa: E402

EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        eos_token_id=EOS, pad_token_id=1, bos_token_id=None, initializer_range=0.1,
    )
    m = transformers.OlmoeForCausalLM(cfg).to(torch.float32).eval()
    return m


def _prompt(n=20, seed=1):
    # Avoid the EOS id inside the prompt; otherwise arbitrary.
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, 128, size=n)]


def test_router_modules(model):
    routers = router_modules(model)
    assert [i for i, _ in routers] == [0, 1, 2]
    assert all(w is model.model.layers[i].mlp.gate.weight for i, w in routers)


def test_none_matches_hf_generate(model):
    prompt = _prompt(12)
    ref = reference_generate(model, prompt, 16, selection="none", eos_token_id=EOS)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=1)
    assert ref["tokens"] == out[0, len(prompt):].tolist()
    assert ref["phases"] == [] and not ref["deltas"].any()


def test_injection(model):
    ids = torch.tensor([_prompt(10)])
    n_moe, n_exp = len(router_modules(model)), model.config.num_experts
    with torch.no_grad():
        base = model(input_ids=ids, output_router_logits=True)
        with deltas_injected(model, torch.zeros(n_moe, n_exp)):
            zero = model(input_ids=ids, output_router_logits=True)
        delta = torch.randn(n_moe, n_exp, generator=torch.Generator().manual_seed(3))
        with deltas_injected(model, delta):
            moved = model(input_ids=ids, output_router_logits=True)
    assert torch.equal(zero.logits, base.logits)
    assert (moved.logits - base.logits).abs().max() > 1e-2
    # Layer 0 sees identical inputs, so its recorded logits must be exactly base + delta[0].
    torch.testing.assert_close(moved.router_logits[0], base.router_logits[0] + delta[0], rtol=0, atol=1e-6)
    # Every layer: the recorded logits are exactly (router input) @ W^T + delta[l].
    inputs = {}
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(
                 lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, _ in router_modules(model)]
    try:
        with torch.no_grad(), deltas_injected(model, delta):
            again = model(input_ids=ids, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    for l, (i, w) in enumerate(router_modules(model)):
        z = inputs[i].reshape(-1, w.shape[1]) @ w.T
        torch.testing.assert_close(again.router_logits[l], z + delta[l], rtol=1e-5, atol=1e-5)
    # Outside the context manager nothing is left behind.
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base.logits)


def test_hard_leaves_unselected_at_zero(model):
    out = reference_generate(model, _prompt(), 4, interval=2, steps=3, selection="hard", ratio=0.5)
    assert len(out["phases"]) == 2
    for ph in out["phases"]:
        assert ph["weights"].sum() == 1  # floor(0.5 * 3) = 1 layer
    touched = {int(np.argmax(ph["weights"])) for ph in out["phases"]}
    for l in range(out["deltas"].shape[0]):
        assert out["deltas"][l].any() == (l in touched)


def test_first_phase_improves_loss(model):
    out = reference_generate(model, _prompt(), 1)
    ph = out["phases"][0]
    assert ph["context_len"] == 20
    assert ph["loss_after"] < ph["loss_before"]
    np.testing.assert_allclose(ph["weights"].sum(), 1.0)
    assert np.all(ph["scores"] > 0)


def test_persist_optimizer_matters(model):
    kw = dict(interval=3, steps=3, eos_token_id=None)
    a = reference_generate(model, _prompt(), 6, persist_optimizer=True, **kw)
    b = reference_generate(model, _prompt(), 6, persist_optimizer=False, **kw)
    assert len(a["phases"]) == len(b["phases"]) == 2
    # Phase 0 is identical (fresh Adam either way); the second phase sees different moments.
    assert a["phases"][0]["loss_after"] == b["phases"][0]["loss_after"]
    assert np.abs(a["deltas"] - b["deltas"]).max() > 1e-4
