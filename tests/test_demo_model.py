"""The shipped demo model (rewire_jax/demo/model) and the training script that produces it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import rewire_jax

MODEL_DIR = Path(rewire_jax.__file__).parent / "demo" / "model"
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"

needs_model = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(),
                                 reason="demo model not built (python -m rewire_jax.demo.train)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@needs_model
def test_shipped_files_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "MODEL_CARD.md"} <= names
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20_000_000
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert "Corpus fingerprint" in card and "held-out" in card


@needs_model
def test_autotokenizer_loads(tokenizer):
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == PROMPT
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert len(tokenizer) == cfg["vocab_size"]


@needs_model
def test_transformers_and_rewire_jax_agree(tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import OlmoeForCausalLM

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    model = rewire_jax.load(MODEL_DIR)
    assert model.config.model_type == "olmoe" and model.tokenizer is not None
    ours = np.asarray(model(np.asarray(ids)))
    hf = OlmoeForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert ours.shape == theirs.shape == (1, len(ids), model.config.vocab_size)
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    # A trained model: the next-token distribution is far from uniform on code.
    z = ours[0] - ours[0].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert nll < 0.6 * np.log(model.config.vocab_size)


def test_tiny_training_run_end_to_end(tmp_path):
    from rewire_jax.demo import train

    out = tmp_path / "tiny"
    summary = train.main([
        "--out", str(out), "--steps", "3", "--vocab-size", "300", "--hidden-size", "32",
        "--num-layers", "2", "--num-heads", "2", "--num-experts", "4", "--top-k", "2",
        "--expert-width", "16", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1",
        "--max-files", "8", "--eval-every", "2", "--eval-windows", "3", "--final-eval-windows", "5",
        "--log-every", "1", "--sample-tokens", "4",
    ])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "MODEL_CARD.md", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    assert np.isfinite(summary["heldout_loss"]) and np.isfinite(summary["prose_loss"])
    assert len(summary["balance_heldout"]["norm_entropy"]) == 2

    model = rewire_jax.load(out)
    assert model.config.num_experts == 4 and model.config.vocab_size == 300
    assert model.tokenizer is not None and len(model.tokenizer) == 300
    logits = model(model.encode("x = 1\n"))
    assert logits.shape[-1] == 300 and np.all(np.isfinite(np.asarray(logits)))
