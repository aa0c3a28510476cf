"""Sections of the benchmark beyond the main table: the dispatch paths on the device, and the
optimise phase with its lowest updated layer at 3/4 depth (plain vs layers-below computed once)."""
from __future__ import annotations

import time

import numpy as np

from .perf import _timed, head_flops, layer_flops, phase_flops

def dispatch_table(shape, args) -> dict:
    """Forward + backward (w.r.t. tokens and combine weights) of one MoE layer's routed experts at
    prefill / phase shapes, every dispatch path, on the default device: checks the automatic choice."""
    import jax
    import jax.numpy as jnp
    from rewire_jax.model import dispatch as moe
    E, k, d, I = shape.experts, shape.top_k, shape.hidden, shape.intermediate
    out = {}
    for dt in args.dtypes:
        for N in (256, 1024, 4096):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.normal(size=(N, d)), dt)
            ex = {n: jnp.asarray(rng.normal(size=s) * 0.05, dt) for n, s in
                  (("gate_up_proj", (E, d, 2 * I)), ("down_proj", (E, I, d)))}
            w, idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(N, E)), jnp.float32)), k)
            for method in [m for m in moe.METHODS if m != "kernel" or moe.tokamax_available()]:
                f = jax.jit(jax.grad(lambda x, w: jnp.sum(moe.dispatch(x, w, idx, ex, method).astype(jnp.float32) ** 2),
                                     argnums=(0, 1)))
                jax.block_until_ready(f(x, w))
                t = min(_timed(lambda: jax.block_until_ready(f(x, w))) for _ in range(5))
                out[f"{dt} N={N} {method}"] = {"ms": 1e3 * t, "useful_gflops": 2 * 2 * 3 * N * k * d * I / t / 1e9}
        print("  dispatch fwd+bwd: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in out.items() if dt in k), flush=True)
    out["auto"] = {str(N): moe.choose_method(N, k, E, hidden=d, inter=I) for N in (1, 256, 1024, 4096)}
    return out


def split_benchmark(model, prompt, args, ropts) -> dict:
    """Optimise phase with the lowest updated layer at 3/4 depth: plain vs layers-below-once.

    'hard': the routers of the top quarter of the layers are scaled by 0.01 (near-uniform routing has
    the largest Eq.-2 score), so hard selection with ratio 1/4 picks exactly those layers; the split
    point is found at run time from the first step's scores. 'last_k': the same layers, statically.
    """
    import jax
    import jax.numpy as jnp
    from rewire_jax import rewire as R
    from rewire_jax.model.weights import layer_plan
    cfg = model.config
    L, Lm = cfg.num_layers, cfg.num_moe_layers
    top = 3 * L // 4
    params = jax.tree.map(lambda x: x, model.params)    # a new tree (leaves shared) to edit
    scaled = 0
    for s, st in enumerate(layer_plan(cfg)):
        for j in range(st.unit):
            mlp = params["stacks"][str(s)][str(j)].get("mlp", {})
            if "router" in mlp:   # router [repeats, d, E]: scale the rows of the layers >= top
                scale = np.array([0.01 if st.layer(r, j) >= top else 1.0 for r in range(st.repeats)], np.float32)
                mlp["router"] = mlp["router"] * jnp.asarray(scale, mlp["router"].dtype)[:, None, None]
                scaled += int((scale < 1).sum())
    if scaled != L - top:
        raise ValueError(f"split benchmark: scaled {scaled} routers, expected the top {L - top} layers' routers")
    T = args.split_context or R.bucket_length(len(prompt) + args.new_tokens // 2)
    tokens = jnp.asarray(np.resize(np.asarray(prompt), T)[None], jnp.int32)
    out: dict = {"context": T, "lowest_layer": top}

    def phase(opts):
        d = jnp.zeros((1, *cfg.delta_shape))
        a = (params, d, R.init_opt_state(opts, d), tokens, jnp.array([T]), jnp.array([True]), np.zeros(Lm, bool))
        t0 = time.perf_counter()
        o = jax.block_until_ready(R.optimise_phase(*a, cfg, opts))
        return o, time.perf_counter() - t0

    for sel, extra in (("hard", dict(ratio=(L - top) / L)), ("last_k", dict(last_k=Lm - cfg.moe_index(top)))):
        res, times = {}, {False: [], True: []}
        variants = {cb: ropts.replace(selection=sel, cache_below=cb, **extra) for cb in (False, True)}
        for cb in (False, True):
            phase(variants[cb])                 # compile
        for _ in range(args.repeats + 1):      # interleaved, best of
            for cb in (False, True):
                res[cb], dt = phase(variants[cb])
                times[cb].append(dt)
        sel_layers = [cfg.moe_layers[i] for i in np.flatnonzero(np.asarray(res[True].weights)[0] > 0)]
        lowest = min(sel_layers)
        plain_brief = ropts.steps * (sum(layer_flops(cfg, T)[0] for _ in range(L)) + head_flops(cfg, T)
                                     + sum(layer_flops(cfg, T)[1] for _ in range(L - lowest - 1)) + head_flops(cfg, T))
        cached = phase_flops(cfg, T, ropts.steps, lowest, split=lowest)
        plain_actual = phase_flops(cfg, T, ropts.steps, 0)   # jax.grad of every delta row: back to layer 0
        t_plain, t_cached = min(times[False]), min(times[True])
        out[sel] = {"selected_layers": sel_layers, "t_plain": t_plain, "t_cached": t_cached,
                    "speedup": t_plain / t_cached, "predicted_brief": plain_brief / cached,
                    "saving_achieved": (1 - t_cached / t_plain) / (1 - cached / plain_brief),
                    "predicted_actual_plain": plain_actual / cached,
                    "max_abs_delta_diff": float(jnp.abs(res[True].deltas - res[False].deltas).max()),
                    "gflops_cached": cached / 1e9 / t_cached}
        print(f"  split {sel}: {out[sel]}", flush=True)
    return out
