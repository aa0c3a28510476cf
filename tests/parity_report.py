"""Print the README's parity table: max |logit diff| vs transformers (fp32) for every tiny variant.

    .venv/bin/python tests/parity_report.py
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import hf_models  # noqa: E402
import rewire_jax  # noqa: E402
from rewire_jax.bench.torch_reference import hf_logits  # noqa: E402


def max_diffs(name: str, seq_len: int = 13) -> tuple[float, float, float]:
    tm = hf_models.build(name)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d)
        model = rewire_jax.load(d)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, seq_len))
    delta = np.random.default_rng(1).normal(0, 1.0, model.config.delta_shape).astype(np.float32)
    ref0, ref1 = hf_logits(tm, ids), hf_logits(tm, ids, delta)
    d0 = float(np.abs(np.asarray(model(ids)) - ref0).max())
    d1 = float(np.abs(np.asarray(model(ids, delta)) - ref1).max())
    return d0, d1, float(np.abs(ref0).max())


if __name__ == "__main__":
    print("| variant | model_type | max abs diff, δ=0 | max abs diff, random δ | max abs logit |")
    print("|---|---|---|---|---|")
    for name in hf_models.VARIANTS:
        d0, d1, scale = max_diffs(name)
        mt = hf_models.build(name).config.model_type
        print(f"| {name} | `{mt}` | {d0:.1e} | {d1:.1e} | {scale:.2f} |", flush=True)
