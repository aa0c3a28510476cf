"""Batching without waste: the optimise phase grouped by context bucket, the decode paths that
keep a batched step cheap (dispatch over the experts hit, attention without a cache transpose,
greedy as max + min), all exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from rewire_jax import RewireOptions
from rewire_jax.generation.grouping import _pow2, phase_grouped, plan_groups
from rewire_jax.generation.sampling import greedy
from rewire_jax.model import dispatch as D
from rewire_jax.model import layers as L
from rewire_jax.rewire import bucket_length, run_phase, start_cycle


def test_plan_groups_cover_rows_once_and_split_long_from_short():
    rows = [(i, 64) for i in range(8)] + [(8 + i, 512) for i in range(8)]
    groups = plan_groups(rows, 16)
    assert sorted(r for _, g in groups for r in g) == list(range(16))
    assert [(b, sorted(g)) for b, g in groups] == [(64, list(range(8))), (512, list(range(8, 16)))]
    # neighbouring buckets with few rows: one call is cheaper than two
    assert len(plan_groups([(0, 128), (1, 144)], 16)) == 1
    assert all(len(g) <= 4 for _, g in plan_groups([(i, 64 * (1 + i % 3)) for i in range(20)], 4))
    assert [_pow2(n, 64) for n in (1, 2, 3, 5, 7, 9, 13, 17, 100)] == [1, 2, 3, 6, 8, 12, 16, 24, 64]


def test_grouped_phase_equals_one_padded_phase(loaded):
    """Rows of very different contexts run in separate sub-batches, each at its own bucket; each
    row's result equals the plain phase over the whole batch padded to the longest."""
    _, model = loaded("olmoe")
    cfg = model.config
    lens = [20, 150, 22, 148, 24, 9]
    S = 256
    buf = np.zeros((len(lens), S), np.int32)
    for b, n in enumerate(lens):
        buf[b, :n] = hf_models.prompt(n, seed=b + 1)
    lengths = np.array(lens, np.int32)
    active = np.array([True, True, True, True, True, False])
    opts = RewireOptions(selection="soft")
    assert len(plan_groups([(r, bucket_length(n, cap=S)) for r, n in enumerate(lens) if active[r]], 6)) == 2
    d0 = np.random.default_rng(0).normal(0, 0.1, (len(lens), *cfg.delta_shape)).astype(np.float32)
    grouped, gout = phase_grouped(model.params, start_cycle(cfg, opts, len(lens), d0), buf, lengths, active, S,
                                  cfg, opts)
    Tb = bucket_length(max(lens), cap=S)
    plain, pout = run_phase(model.params, start_cycle(cfg, opts, len(lens), d0), buf[:, :Tb], lengths, cfg, opts,
                            jnp.asarray(active))
    assert np.abs(np.asarray(grouped.deltas) - np.asarray(plain.deltas)).max() <= 1e-5
    assert np.abs(np.asarray(grouped.deltas)[5] - d0[5]).max() == 0      # inactive row untouched
    np.testing.assert_allclose(np.asarray(gout.loss)[active], np.asarray(pout.loss)[active], atol=1e-5)
    np.testing.assert_allclose(np.asarray(gout.weights)[active], np.asarray(pout.weights)[active], atol=1e-5)
    assert grouped.phase_index == plain.phase_index == 1


@pytest.mark.parametrize("H,K", [(4, 4), (8, 2), (6, 1)])
def test_decode_attention_without_cache_transpose_equals_general_path(H, K):
    rng = np.random.default_rng(H * 10 + K)
    B, S, D = 3, 40, 16
    q = jnp.asarray(rng.normal(size=(B, 1, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, D)), jnp.float32)
    pos = jnp.asarray([[3], [17], [39]])
    mask = L.attention_mask(pos, jnp.broadcast_to(jnp.arange(S), (B, S)), window=10 if K == 2 else None)
    fast = L._decode_attend(q, k, v, mask, 0.25)
    general = L._attention_core(*_general_inputs(q, k, v, mask), None, 0.25)
    general = general.transpose(0, 3, 1, 2, 4).reshape(B, 1, H, D)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(general), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(L.attend(q, k, v, mask, 0.25)), np.asarray(general), atol=1e-6, rtol=1e-6)


def _general_inputs(q, k, v, mask):
    B, T, H, D = q.shape
    K = k.shape[2]
    qt = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    bias = jnp.where(mask, 0.0, L.NEG_INF).astype(jnp.float32)
    return qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias


def test_greedy_is_argmax_with_ties_and_nan():
    x = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
    x[1, [3, 7, 20]] = 9.0           # ties: the first index
    x[2, [4, 30]] = np.nan           # NaN: the first NaN, as jnp.argmax
    x[3] = 0.0
    x[4, -1] = np.inf
    assert np.asarray(greedy(jnp.asarray(x))).tolist() == np.asarray(jnp.argmax(jnp.asarray(x), -1)).tolist()


@pytest.mark.parametrize("N", [1, 3, 16, 64])
def test_blocked_dispatch_over_hit_experts_equals_dense(N):
    """The blocked path loops over the experts hit only (few rows: small blocks); forward and the
    gradient w.r.t. the tokens and combine weights equal the dense reference."""
    rng = np.random.default_rng(N)
    E, k, d, I = 16, 2, 24, 8
    ex = {n: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
          for n, s in (("gate_proj", (E, d, I)), ("up_proj", (E, d, I)), ("down_proj", (E, I, d)))}
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    w, idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(N, E)), jnp.float32)), k)
    loss = lambda m: lambda x, w: jnp.sum(D.dispatch(x, w, idx, ex, m) ** 2)
    for m in ("blocked", "auto"):
        np.testing.assert_allclose(D.dispatch(x, w, idx, ex, m), D.dispatch(x, w, idx, ex, "dense"), atol=1e-5)
        for a, b in zip(jax.grad(loss(m), (0, 1))(x, w), jax.grad(loss("dense"), (0, 1))(x, w)):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert D.choose_block(N * k, E) == (4 if N * k // E <= 4 else 8 if N * k // E <= 8 else 16)


def test_batch_table_runs_and_measures_idle_rows(tmp_path):
    """`python -m rewire_jax.bench.batch` on the demo model, tiny: every row is measured, the
    distinct-experts column is within [k, min(E, B*k)], and the queue's idle fraction is computed
    from the same budgets as lock-step's."""
    import json
    from rewire_jax.bench import batch
    out = tmp_path / "batch.json"
    batch.main(["--models", "demo", "--batches", "1", "2", "--new-tokens", "20", "--queue-prompts", "6",
                "--queue-batch", "3", "--skip-hf", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {r["batch"]: r for r in res["rows"]}
    assert set(rows) == {1, 2}
    for B, r in rows.items():
        assert r["baseline"]["tok_s"] > 0 and r["rewired"]["optimise"] > 0
        assert r["top_k"] <= r["distinct_experts"] <= min(r["experts"], B * r["top_k"])
    assert rows[1]["distinct_experts"] == rows[1]["top_k"]
    q = res["queue"][0]
    assert 0 <= q["queue_idle_fraction"] < 1 and 0 <= q["lockstep_idle_fraction"] < 1
    assert q["queue_stats"]["refills"] == 6


def test_batch_table_rejects_no_warm_runs():
    from rewire_jax.bench import batch
    with pytest.raises(ValueError, match="warm-runs"):
        batch.model_rows("demo", [1], 4, skip_hf=True, rewired_max=1, warm_runs=0)
