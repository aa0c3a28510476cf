"""Speed paths: every MoE dispatch path equals the dense reference; the phase that computes the
layers below the lowest updated layer once equals the plain phase; a whole multi-phase generation
compiles a bounded set of programs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rewire_jax
from rewire_jax import RewireOptions, moe
from rewire_jax import rewire as R
from rewire_jax.api import Model
from rewire_jax.perf import count_compiles
from rewire_jax.config import ModelConfig
from rewire_jax.model import init_params
from rewire_jax.model.weights import stack_of

# (tokens, d, I, E, k, biases, activation)
DISPATCH_CASES = [(64, 16, 12, 6, 3, True, "gptoss"), (3, 8, 4, 4, 2, True, "silu"),
                  (150, 24, 16, 16, 4, False, "silu")]


def _experts(rng, E, d, I, bias):
    ex = {"gate_proj": rng.normal(size=(E, d, I)), "up_proj": rng.normal(size=(E, d, I)),
          "down_proj": rng.normal(size=(E, I, d))}
    if bias:
        ex.update(gate_bias=rng.normal(size=(E, I)), up_bias=rng.normal(size=(E, I)), down_bias=rng.normal(size=(E, d)))
    return {n: jnp.asarray(a / np.sqrt(a.shape[-2] if a.ndim == 3 else 4), jnp.float32) for n, a in ex.items()}


def _plain_attention(q, k, v, mask, scale, sinks):
    """Straightforward masked softmax attention (autodiff'd), the reference for `layers.attend`."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.where(mask[:, None], jnp.einsum("bthd,bshd->bhts", q, k) * scale, -1e30)
    if sinks is not None:
        s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], s.shape[:-1] + (1,))], -1)
    p = jax.nn.softmax(s, axis=-1)[..., :T if sinks is None else -1]
    return jnp.einsum("bhts,bshd->bthd", p[..., :k.shape[1]], v)


@pytest.mark.parametrize("T,H,K,window,sinks", [(300, 4, 2, None, False), (272, 4, 4, 40, True),
                                                (64, 2, 1, None, True)])
def test_causal_attention_blocks_equal_plain_attention(T, H, K, window, sinks, monkeypatch):
    """`attend(..., causal=True)` (query blocks that skip the masked keys, hand-written VJP) equals
    plain masked attention: outputs and gradients w.r.t. q, k, v and the sinks, with right padding."""
    from rewire_jax import layers as L
    monkeypatch.setattr(L, "ATTN_BLOCK", 64)         # several blocks at test sizes
    rng = np.random.default_rng(T)
    B, D = 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, h, D)), jnp.float32) for h in (H, K, K))
    sink = jnp.asarray(rng.normal(size=H), jnp.float32) if sinks else None
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = L.attention_mask(pos, pos, jnp.arange(T)[None] < jnp.array([[T], [T - 37]]), window)
    cot = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)

    def grads(fn):
        loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, mask, 0.3, s) * cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) + ((3,) if sinks else ())))(q, k, v, sink)

    want = grads(_plain_attention)
    for causal in (False, True):
        got = grads(lambda *a: L.attend(*a, causal=causal, window=window))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for a, b in zip(got[1], want[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"causal={causal}")


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda c: f"N{c[0]}-E{c[3]}-k{c[4]}-{c[6]}{'-bias' if c[5] else ''}")
def test_dispatch_paths_agree_with_dense(case):
    """Outputs and gradients (tokens, combine weights, expert weights) of every path."""
    N, d, I, E, k, bias, act = case
    rng = np.random.default_rng(N)
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    ex = _experts(rng, E, d, I, bias)
    # skewed routing: some experts get many rows, some none
    logits = jnp.asarray(rng.normal(size=(N, E)) * 2 + np.linspace(0, 3, E), jnp.float32)
    w, idx = jax.lax.top_k(jax.nn.softmax(logits), k)

    def run(method, **kw):
        fn = (lambda *a: moe.dispatch_blocked(*a, act, 1.5, **kw)) if kw else \
             (lambda *a: moe.dispatch(*a, method, act, 1.5))

        def loss(x, w, ex):
            y = fn(x, w, idx, ex)
            return jnp.sum(jnp.tanh(y)), y
        (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, ex)
        return y, g

    y_ref, g_ref = run("dense")
    for method, kw in (("gather", {}), ("blocked", {}), ("blocked", {"block": 8}), ("ragged", {})):
        y, g = run(method, **kw)
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5, err_msg=f"{method} {kw}")
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=f"{method} {kw} gradient")


def test_dispatch_choice_is_per_backend_and_overridable(monkeypatch):
    monkeypatch.delenv("REWIRE_JAX_DISPATCH", raising=False)
    assert moe.choose_method(1, 4, 32, "cpu") == "gather"        # decode
    assert moe.choose_method(512, 4, 32, "cpu") == "blocked"
    assert moe.choose_method(512, 8, 64, "gpu", 2048, 1024) == "ragged"     # OLMoE-1B-7B size
    assert moe.choose_method(512, 8, 64, "tpu", 2048, 1024) == "ragged"
    assert moe.choose_method(1024, 4, 32, "gpu", 512, 256) == "dense"        # small: latency-bound
    # the choice is an explicit option (model setting or per call), never an environment variable
    monkeypatch.setenv("REWIRE_JAX_DISPATCH", "dense")
    assert moe.choose_method(512, 4, 32, "cpu") == "blocked"
    assert CFG.replace(dispatch="dense").dispatch == "dense"
    with pytest.raises(rewire_jax.model.ConfigError, match="dispatch 'nope'"):
        CFG.replace(dispatch="nope")
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        moe.dispatch(jnp.zeros((2, 4)), jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32),
                     _experts(np.random.default_rng(0), 2, 4, 4, False), "nope")


def test_padded_layout_is_exact_and_bounded():
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 5, (40, 3)), jnp.int32)
    plan = moe.make_plan(idx, 5, 8)
    P = moe.padded_rows(120, 5, 8)
    assert plan.src.shape == (P,) and P % 8 == 0
    src = np.asarray(plan.src)
    assert sorted(src[src < 120].tolist()) == list(range(120))      # every row exactly once
    dest = np.asarray(plan.dest).reshape(-1)
    assert np.array_equal(src[dest], np.arange(120))
    # each expert's rows lie inside its own blocks
    for e in range(5):
        rows = dest[np.asarray(idx).reshape(-1) == e]
        b0, nb = int(plan.first_block[e]), int(plan.num_blocks[e])
        assert rows.min(initial=b0 * 8) >= b0 * 8 and rows.max(initial=0) < (b0 + nb) * 8


# -- the phase: layers below the lowest updated one computed once ----------------------------------

CFG = ModelConfig(model_type="olmoe", vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_layers=(0, 1, 2, 3), qk_norm="flat")


@pytest.fixture(scope="module")
def params():
    p = jax.jit(lambda k: init_params(CFG, k))(jax.random.key(0))
    p = jax.tree.map(lambda a: a * 4 if a.ndim > 1 else a, p)      # decisive routing and logits
    for layer in (2, 3):   # near-uniform routers on the top half: the largest Eq.-2 scores, so 'hard' picks them
        s, rep, sub = stack_of(CFG, layer)
        mlp = p["stacks"][str(s)][str(sub)]["mlp"]
        mlp["router"] = mlp["router"].at[rep].multiply(0.01)
    return p


@pytest.mark.parametrize("opts", [dict(selection="hard"), dict(selection="last_k", last_k=1),
                                  dict(selection="random", seed=1, soft_mode="grad")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_phase_equals_plain_phase(params, opts):
    B, T = 2, 24
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (B, T)), jnp.int32)
    lengths, active = jnp.array([T, 17]), jnp.array([True, True])
    rmask = R.random_layer_mask(RewireOptions(**opts), CFG.num_moe_layers, 0)
    outs = {}
    for cb in (False, True):
        o = RewireOptions(cache_below=cb, **opts)
        d0 = jnp.asarray(np.random.default_rng(2).normal(0, 0.1, (B, *CFG.delta_shape)), jnp.float32)
        state = R.init_opt_state(o, d0)
        # a phase on top of earlier ones: nonzero deltas and Adam moments
        d0, state = R.masked_adam_update(o, d0 * 3, d0, state, jnp.ones((B, 4)), jnp.ones((B, 4), bool))
        outs[cb] = R.optimise_phase(params, d0, state, tokens, lengths, active, jnp.asarray(rmask), CFG, o)
    for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    moved = np.abs(np.asarray(outs[True].deltas) - np.asarray(outs[False].deltas)).max()
    assert moved <= 1e-6
    if opts["selection"] == "hard":   # the split really is above layer 0 here
        assert np.all(np.asarray(outs[True].weights)[:, :2] == 0)


def test_hard_phase_runs_backward_only_above_the_lowest_layer(params):
    """The first step finds the lowest selected layer at run time; the rest start there."""
    o = RewireOptions(selection="hard")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (1, 16)), jnp.int32)
    d = jnp.zeros((1, *CFG.delta_shape))
    _, _, split, x_split = R._first_step_jit(params, d, R.init_opt_state(o, d), tokens, jnp.array([16]),
                                             jnp.array([True]), jnp.zeros(4, bool), R.hyper_array(o),
                                             cfg=CFG, opts=R.static_options(o), dispatch="auto")
    assert int(split) == 2 and x_split.shape == (1, 16, CFG.hidden_size)
    assert R.host_split(RewireOptions(selection="last_k", last_k=1), CFG, None) == 3
    assert R.host_split(RewireOptions(selection="soft"), CFG, None) == 0
    assert R.host_split(RewireOptions(selection="hard", cache_below=False), CFG, None) == 0


# -- compilation: bounded, and nothing recompiles for a new phase of an already seen length ----------

BIG = ("_steps_impl", "_first_step_impl", "prefill", "decode")


def _names(compiled):
    return [n[4:-1] if n.startswith("jit(") else n for n in compiled]


def test_generation_compiles_a_bounded_number_of_programs(params):
    model = Model(CFG, params)
    prompt = np.random.default_rng(3).integers(3, 96, 20).tolist()
    opts = RewireOptions(interval=8, selection="soft", lr=0.01)
    rewire_jax.generate(model, [prompt], 1, rewire=opts, eos_token_id=None)    # first-use eager ops
    with count_compiles() as names:
        out = rewire_jax.generate(model, [prompt], 60, rewire=opts, eos_token_id=None)
    names = _names(names)
    big = [n for n in names if n in BIG]
    contexts = [int(p.context_len[0]) for p in out.phases]
    assert len(out.phases) == 8 and contexts == list(range(20, 77, 8))
    buckets = {R.bucket_length(c) for c in contexts}           # 32, 48, 64, 80: 4 length buckets
    assert len(buckets) == 4
    # one optimise and one prefill program per length bucket, one decode program per window
    # bucket: 8 phases, never 8 compiles of each
    assert big.count("_steps_impl") <= len(buckets) and big.count("prefill") <= len(buckets)
    assert big.count("decode") <= len(buckets) + 1
    assert len(names) - len(big) <= 10, names                   # nothing else of any size
    # again, shorter (same KV cache size), other hyperparameters: no new program
    with count_compiles() as again:
        rewire_jax.generate(model, [prompt], 28, rewire=opts.replace(lr=0.02, eps=1e-4), eos_token_id=None,
                            cache_len=80)
    assert [n for n in _names(again) if n in BIG] == [], again


def test_one_decode_program_per_window_bucket_in_a_call(params):
    """A call's decode chunks compile one program per distinct window, the first chunk included (its
    fresh decode state is placed like the later chunks' inputs) and a window that reaches the cache
    being the whole cache (no separate program for it)."""
    from rewire_jax.generation.decode import decode, decode_window
    cfg = CFG.replace(max_position_embeddings=CFG.max_position_embeddings + 1)   # a config no other test compiles
    model = Model(cfg, jax.device_put(params, jax.devices()[0]))                 # committed params
    prompt = np.random.default_rng(5).integers(3, 96, 10).tolist()
    before = decode._cache_size()
    rewire_jax.generate(model, [prompt], 40, segment=8, eos_token_id=None)     # cache 64, 5 chunks
    windows = {decode_window(n + 8, 64) for n in range(10, 50, 8)}
    assert windows == {32, 48, None}
    assert decode._cache_size() - before == len(windows)
    # masked chunks (GPU/TPU): 3 device calls of 3 steps per 8-step segment, still one program per window
    from rewire_jax.generation import DecodeChunks
    before = decode._cache_size()
    rewire_jax.generate(model, [prompt], 40, segment=8, eos_token_id=None, chunks=DecodeChunks(3))
    windows = {decode_window(n + 8, 64, masked=True) for n in range(10, 50, 8)}
    assert decode._cache_size() - before == len(windows)


def test_decode_chunks_and_windows_change_nothing(params, monkeypatch):
    """Decoding in chunks over window buckets of the cache gives the same tokens and phases."""
    import importlib
    G = importlib.import_module("rewire_jax.generation.generate")   # the module (the package exports the function)
    model = Model(CFG, params)
    prompt = np.random.default_rng(4).integers(3, 96, 13).tolist()
    opts = RewireOptions(interval=8, lr=0.01)
    ref = [rewire_jax.generate(model, [prompt], 20, rewire=o, eos_token_id=None) for o in (None, opts)]
    monkeypatch.setattr(G, "DECODE_CHUNK", 3)
    out = [rewire_jax.generate(model, [prompt], 20, rewire=o, eos_token_id=None) for o in (None, opts)]
    assert [r.tokens for r in out] == [r.tokens for r in ref]
    assert len(out[1].phases) == len(ref[1].phases) == 3       # phases every `interval`, not every chunk
    np.testing.assert_allclose(out[1].deltas, ref[1].deltas, atol=1e-6)
    # and device calls of masked chunks (GPU/TPU) inside each segment
    from rewire_jax.generation import DecodeChunks
    out = [rewire_jax.generate(model, [prompt], 20, rewire=o, eos_token_id=None, chunks=DecodeChunks(2))
           for o in (None, opts)]
    assert [r.tokens for r in out] == [r.tokens for r in ref] and len(out[1].phases) == 3
    np.testing.assert_allclose(out[1].deltas, ref[1].deltas, atol=1e-6)
