"""Rewired vs baseline generate on an OLMoE-1B-7B-shaped model with random bf16 weights (a GPU run).

    python -m rewire_jax.bench.gpu_olmoe [--layers 16] [--prompt-len 256] [--new-tokens 512] [--json OUT]

The weights are drawn on the device (`init_params`: nothing is read or written), in bfloat16,
with OLMoE-1B-7B-0924's config (16 layers, hidden 2048, 64 experts top-8 of width 1024, vocab
50304). One prompt, paper defaults (soft selection, 5 steps, interval 128). Each of baseline and
rewired generate runs twice: the first run's extra time is compilation, the second is reported
(tokens/s over the new tokens, its optimise / prefill / decode split), with the rewired/baseline
time ratio (the paper's Table 3: 1.88x) and the device's peak memory.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rewire_jax.bench.gpu_olmoe")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax
    import numpy as np
    from ..api import Model
    from ..generation import generate
    from ..io import families
    from ..model.weights import init_params, num_params
    from ..rewire import RewireOptions
    from .memory import OLMOE_1B_7B

    cfg = families.from_hf({**OLMOE_1B_7B, "num_hidden_layers": a.layers}, dtype=a.dtype)
    t0 = time.perf_counter()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "params": num_params(params), "weights_GB": sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9,
           "init_s": time.perf_counter() - t0, "layers": a.layers, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "dtype": a.dtype}
    print(json.dumps(res), flush=True)
    model = Model(cfg, params)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, a.prompt_len)]
    for label, opts in (("baseline", None), ("rewired", RewireOptions())):
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            r = generate(model, [prompt], a.new_tokens, rewire=opts, eos_token_id=None)
            runs.append((time.perf_counter() - t, r))
        (cold, _), (warm, r) = runs
        res[label] = {"wall_s": warm, "tok_per_s": a.new_tokens / warm, "compile_s": cold - warm,
                      "timing": {k: float(v) for k, v in r.timing.items()}, "phases": len(r.phases)}
        print(label, json.dumps(res[label]), flush=True)
    res["rewired_over_baseline"] = res["rewired"]["wall_s"] / res["baseline"]["wall_s"]
    res["paper_table3_ratio"] = 1.88
    stats = dev.memory_stats() or {}
    res["peak_device_GB"] = stats.get("peak_bytes_in_use", 0) / 1e9
    print(json.dumps({k: res[k] for k in ("rewired_over_baseline", "peak_device_GB")}), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    main()
