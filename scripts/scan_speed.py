"""Scanned vs unrolled layers on the default device: decode ms/token, prefill and one phase on the
benchmark's OLMoE shape (random weights). Used to choose `scan_stack`'s default per backend."""
import time

import jax
import jax.numpy as jnp
import numpy as np

import rewire_jax
from rewire_jax import Sampling
from rewire_jax.generation import DecodeState, decode, prefill
from rewire_jax.model.transformer import prepare_params


def main():
    L = 8
    base = rewire_jax.ModelConfig(model_type="olmoe", vocab_size=8192, hidden_size=512, num_layers=L, num_heads=8,
                                  num_kv_heads=8, head_dim=64, num_experts=32, num_experts_per_tok=4,
                                  moe_intermediate_size=256, moe_layers=tuple(range(L)), qk_norm="flat",
                                  max_position_embeddings=4096)
    params0 = rewire_jax.init_params(base, jax.random.key(0))
    T, S = 1024, 1280
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 8000, (1, T)), jnp.int32)
    lengths, d = jnp.array([T]), rewire_jax.zero_deltas(base, 1)
    print(f"backend {jax.default_backend()}")
    for scan in (True, False):
        cfg = base.replace(scan_layers=scan)
        params = prepare_params(params0, cfg)
        t0 = time.perf_counter()
        logits, cache, _ = prefill(params, tokens, lengths, d, cfg, S, None)
        jax.block_until_ready(logits)
        cold = time.perf_counter() - t0
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(prefill(params, tokens, lengths, d, cfg, S, None)[0])
            ts.append(time.perf_counter() - t0)
        buf = jnp.zeros((1, S), jnp.int32).at[:, :T].set(tokens)
        per = {}
        for steps in (1, 65):
            def run():
                st = DecodeState(jnp.copy(buf), jnp.copy(lengths), jnp.copy(logits), jnp.zeros(1, bool),
                                 jnp.zeros(1, jnp.int32), jax.random.key(0))
                c = jax.tree.map(jnp.copy, cache)
                t0 = time.perf_counter()
                st, c = decode(params, st, c, d, jnp.zeros((0,), jnp.int32), jnp.int32(10 ** 6), cfg, Sampling(),
                               steps, S)
                jax.block_until_ready(st.buf)
                return time.perf_counter() - t0
            run()
            per[steps] = min(run() for _ in range(3))
        rw = rewire_jax.rewirer(cfg)
        dd = rewire_jax.zero_deltas(cfg)
        ph = lambda: jax.block_until_ready(rw.step(params, dd, np.asarray(tokens[:, :512])).deltas)
        ph()
        tp = min((lambda: (lambda t0: (ph(), time.perf_counter() - t0)[1])(time.perf_counter()))() for _ in range(3))
        print(f"scan_layers={scan}: prefill T={T} {min(ts) * 1e3:.1f} ms (cold {cold:.1f} s); decode at context "
              f"{T}: {(per[65] - per[1]) / 64 * 1e3:.2f} ms/token; phase T=512: {tp * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
