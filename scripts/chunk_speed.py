"""Decode chunkings on the default device: ms per decode step of `generate` (baseline, no EOS) on the
benchmark's OLMoE shape (random weights), per `DecodeChunks`, at batch 1 and 16. Used to choose
`default_chunks` per backend (docs/performance.md).

    python scripts/chunk_speed.py [--new-tokens 128] [--repeats 3]
"""
import argparse
import time

import jax
import numpy as np

import rewire_jax
from rewire_jax.api import Model
from rewire_jax.generation import DecodeChunks, Sampling


CHUNKINGS = [DecodeChunks(128, masked=False), DecodeChunks(32, masked=False), DecodeChunks(32, masked=True),
             DecodeChunks(128, masked=True)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="warm runs per row (best of)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    a = p.parse_args(argv)
    L = 8
    cfg = rewire_jax.ModelConfig(model_type="olmoe", vocab_size=8192, hidden_size=512, num_layers=L, num_heads=8,
                                 num_kv_heads=8, head_dim=64, num_experts=32, num_experts_per_tok=4,
                                 moe_intermediate_size=256, moe_layers=tuple(range(L)), qk_norm="flat",
                                 max_position_embeddings=4096)
    model = Model(cfg, jax.jit(lambda k: rewire_jax.init_params(cfg, k))(jax.random.key(0)))
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {a.new_tokens} new tokens, prompts of 64-184 tokens, "
          f"sampling at temperature 1 (seeded), best of {a.repeats}")
    print("| batch | chunks | decode ms/step |")
    print("|---|---|---|")
    for B in a.batches:
        prompts = [rng.integers(3, 8000, int(n)).tolist() for n in rng.integers(64, 185, B)]
        for ch in CHUNKINGS:
            run = lambda: rewire_jax.generate(model, prompts, a.new_tokens, sampling=Sampling(1.0), seed=0,
                                              eos_token_id=None, chunks=ch)
            run()   # compile
            best = min(run().timing["decode"] for _ in range(a.repeats))
            print(f"| {B} | steps={ch.steps} masked={ch.masked} | {1e3 * best / a.new_tokens:.2f} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
