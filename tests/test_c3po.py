"""C3PO (eval/c3po.py) on the bundled demo model, offline: the routing override in the model (every
router family; alpha = 1 is the model's own routing bit for bit, scanned and unrolled), the
re-mixed weights against a hand computation on a 2-neighbour case, the released variant at every
generated token, and `eval c3po-reference` + `eval --methods baseline,c3po,...,rewire` end to end
(resumable) on tiny synthetic task files (tests/fixtures/eval/c3po_*.jsonl)."""
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rewire_jax
from rewire_jax import cli
from rewire_jax.eval import backend as backend_lib
from rewire_jax.eval import c3po
from rewire_jax.eval.methods import parse_method
from rewire_jax.eval.runner import read_records
from rewire_jax.model import RouterConfig, forward, init_params, layer_params, zero_deltas
from rewire_jax.model.dispatch import dispatch_dense
from rewire_jax.model.moe import RouteOverride, moe_block
from rewire_jax.model.routers import pathway_scores, route, route_scores

FIX = Path(__file__).parent / "fixtures" / "eval"
PROMPTS = ["def add(a, b):\n", "import os\n\ndef main():\n", "class Stack:\n    def push(self, x):\n"]


@pytest.fixture(scope="module")
def model():
    return rewire_jax.load(cli.DEMO_MODEL)


def _ids(model, texts=PROMPTS):
    return [backend_lib.encode_prompt(model, t, False) for t in texts]


def _reference(model, texts, pathways=None):
    ids = _ids(model, texts)
    paths = c3po.prompt_pass(model, ids)["pathway"] if pathways is None else pathways
    return c3po.Reference(np.asarray(paths, np.float32), ids, list(texts), [f"r{i}" for i in range(len(texts))],
                          {"model": "demo"})


# -- the routing override in the model -------------------------------------------------------------

ROUTER_CASES = {
    "softmax_topk": dict(router=RouterConfig("softmax_topk")),
    "softmax_topk_norm": dict(router=RouterConfig("softmax_topk"), norm_topk_prob=True),
    "group_limited": dict(router=RouterConfig("group_limited", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    "topk_softmax": dict(router=RouterConfig("topk_softmax", bias=True)),
    "sigmoid_group": dict(router=RouterConfig("sigmoid_group", n_group=4, topk_group=2, routed_scaling_factor=2.5),
                          norm_topk_prob=True),
}


def _family(model, case):
    cfg = model.config.replace(**ROUTER_CASES[case])
    params = init_params(cfg, jax.random.key(0))
    p = layer_params(params, cfg, cfg.moe_layers[-1])["mlp"]
    if "correction_bias" in p:
        p = dict(p, correction_bias=jax.random.normal(jax.random.key(1), p["correction_bias"].shape) * 0.05)
    p = dict(p, router=p["router"] * 50.0)   # spread the router logits (init std 0.02 gives near-ties)
    return cfg, p


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_override_in_every_router_family(model, case):
    """route_scores(pathway_scores(z)) is the router itself; alpha = 1 leaves moe_block's output
    bit-identical; alpha = 0 routes by the target through the family's own selection rule."""
    cfg, p = _family(model, case)
    B, T, d, E = 2, 5, cfg.hidden_size, cfg.num_experts
    x = jax.random.normal(jax.random.key(2), (B, T, d))
    z = (x.reshape(B * T, d) @ p["router"] + p.get("router_bias", 0.0)).astype(jnp.float32)
    w0, i0 = route(z, cfg, p.get("correction_bias"))
    w1, i1 = route_scores(pathway_scores(z, cfg), cfg, p.get("correction_bias"))
    np.testing.assert_array_equal(np.sort(i0, -1), np.sort(i1, -1))
    np.testing.assert_allclose(np.sort(w0, -1), np.sort(w1, -1), rtol=1e-6, atol=1e-7)

    delta = jnp.zeros((B, E))
    y0, aux0 = moe_block(p, x, delta, cfg, "dense")
    target = jnp.asarray(np.random.default_rng(3).dirichlet(np.ones(E), B), jnp.float32)
    if cfg.router.kind == "sigmoid_group":
        target = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (B, E)), jnp.float32)
    active = jnp.ones((B, T), bool)
    y1, aux1 = moe_block(p, x, delta, cfg, "dense", override=(target, jnp.ones(B), active))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(aux1["idx"]), np.asarray(aux0["idx"]))

    y2, aux2 = moe_block(p, x, delta, cfg, "dense", override=(target, jnp.zeros(B), active))
    wt, it = route_scores(jnp.repeat(target, T, axis=0), cfg, p.get("correction_bias"))
    np.testing.assert_array_equal(np.asarray(aux2["idx"]).reshape(B * T, -1), np.asarray(it))
    want = dispatch_dense(x.reshape(B * T, d), wt, it, {n: p[n] for n in p if n.endswith(("_proj", "_bias"))
                                                         and n not in ("router_bias",)},
                          cfg.expert_activation, cfg.swiglu_limit).reshape(B, T, d)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_alpha_one_is_the_baseline_bit_for_bit(model, scan):
    """Unrolled and scanned stacks: an override with alpha = 1 (any target) gives the logits of no
    override exactly; a partial override (two layers, from a per-row start) leaves the other
    layers and the earlier tokens alone and matches between the two layouts."""
    cfg = model.config.replace(scan_layers=scan)
    L, E = cfg.delta_shape
    toks = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)), jnp.int32)
    target = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(E), (2, L)), jnp.float32)
    base, aux0 = forward(model.params, toks, zero_deltas(cfg, 2), cfg)
    one = RouteOverride(target, jnp.ones((2, L)), jnp.zeros(2, jnp.int32))
    logits1, _ = forward(model.params, toks, zero_deltas(cfg, 2), cfg, route=one)
    np.testing.assert_array_equal(np.asarray(logits1), np.asarray(base))
    alpha = np.ones((2, L), np.float32)
    alpha[:, -2:] = 0.0
    part = RouteOverride(target, jnp.asarray(alpha), jnp.asarray([4, 9], jnp.int32))
    logits2, aux2 = forward(model.params, toks, zero_deltas(cfg, 2), cfg, route=part)
    idx0, idx2 = np.asarray(aux0["idx"]), np.asarray(aux2["idx"])
    np.testing.assert_array_equal(idx2[:, :-2], idx0[:, :-2])
    for b, start in enumerate((4, 9)):
        np.testing.assert_array_equal(idx2[b, :, :start], idx0[b, :, :start])
        want = np.sort(np.argsort(-np.asarray(target[b, -2:]), -1)[:, :cfg.num_experts_per_tok], -1)
        assert (np.sort(idx2[b, -2:, start:], -1) == want[:, None]).all()
    if scan:   # the same numbers as the unrolled layout
        other, _ = forward(model.params, toks, zero_deltas(model.config, 2), model.config, route=part)
        np.testing.assert_allclose(np.asarray(logits2), np.asarray(other), rtol=1e-5, atol=1e-5)


# -- kernel regression: a hand computation on 2 neighbours -------------------------------------------

def _stub(vectors):
    """An embedder that maps each text to a fixed vector."""
    return lambda texts, ids: np.asarray([vectors[t] for t in texts], np.float64)


def test_remixed_weights_equal_a_hand_computation_on_two_neighbours(model):
    cfg = model.config
    L, E, k = cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(7)
    omegas = rng.dirichlet(np.ones(E) * 0.3, (2, L)).astype(np.float32)   # the 2 neighbours' pathways
    ref = _reference(model, PROMPTS[:2], omegas)
    test_text = PROMPTS[2]
    vec = {PROMPTS[0]: [1.0, 0.0, 0.0], PROMPTS[1]: [0.0, 1.0, 0.0], test_text: [0.6, 0.3, 0.2]}
    q = np.asarray(vec[test_text]) / np.linalg.norm(vec[test_text])
    sims = np.array([q[0], q[1]])                                          # cosines to the unit refs

    for variant, alpha in (("paper", 0.5), ("released", 0.0)):
        opts = c3po.C3POOptions(variant=variant, k=2, layers=2, bandwidth=0.5,
                                alphas=(0.5,) if variant == "paper" else ())
        K = np.exp(-(2 - 2 * sims) / (2 * 0.5 ** 2)) if variant == "paper" else sims
        omega_hat = (K[0] * omegas[0] + K[1] * omegas[1]) / (K[0] + K[1])  # Eq. 8
        engine = c3po.C3PO(model, ref, opts, embedder=_stub(vec))
        ids = _ids(model, [test_text])
        r, infos = engine.plan([test_text], ids)
        assert infos[0]["neighbours"] == ["r0", "r1"] and infos[0]["alpha"] == alpha
        np.testing.assert_allclose(infos[0]["kernel"], K, rtol=1e-12)
        np.testing.assert_allclose(r.target[0, -2:], omega_hat[-2:], rtol=1e-6)
        assert (r.target[0, :-2] == 0).all() and (r.alpha[0, :-2] == 1).all() and (r.alpha[0, -2:] == alpha).all()
        P = len(ids[0])
        assert r.start[0] == (0 if variant == "paper" else P - 1)

        # in the model: at the last MoE layer, scores' = alpha * softmax(z) + (1 - alpha) * omega_hat,
        # its top-k and the scores there (OLMoE: no renormalisation) are the combine weights
        x = jax.random.normal(jax.random.key(4), (1, P, cfg.hidden_size))
        p = layer_params(model.params, cfg, cfg.moe_layers[-1])["mlp"]
        z = np.asarray(x[0] @ p["router"], np.float64)
        own = np.exp(z - z.max(-1, keepdims=True))
        own /= own.sum(-1, keepdims=True)
        mixed = c3po.remix(own, omega_hat[-1], alpha)                      # Eq. 9, [P, E]
        hand_idx = np.argsort(-mixed, -1)[:, :k]
        hand_w = np.take_along_axis(mixed, hand_idx, -1)
        active = jnp.asarray(np.arange(P)[None] >= r.start[:, None])
        y, aux = moe_block(p, x, jnp.zeros((1, E)), cfg, "dense",
                           override=(jnp.asarray(r.target[:, -1]), jnp.asarray(r.alpha[:, -1]), active))
        rows = np.arange(P) >= r.start[0]
        np.testing.assert_array_equal(np.sort(np.asarray(aux["idx"][0])[rows], -1), np.sort(hand_idx[rows], -1))
        experts = {n: p[n] for n in ("gate_up_proj", "down_proj")}
        want = dispatch_dense(x[0][rows], jnp.asarray(hand_w[rows], jnp.float32), jnp.asarray(hand_idx[rows]),
                              experts)
        np.testing.assert_allclose(np.asarray(y[0])[rows], np.asarray(want), rtol=1e-5, atol=1e-6)


def test_paper_alpha_is_the_grid_point_of_lowest_prompt_loss(model):
    ref = _reference(model, PROMPTS[:2])
    opts = c3po.C3POOptions(k=2)
    assert opts.alphas == c3po.PAPER_ALPHAS and opts.kernel == "gaussian" and opts.scope == "all"
    r, infos = c3po.C3PO(model, ref, opts).plan([PROMPTS[2]], _ids(model, [PROMPTS[2]]))
    losses = {float(a): v for a, v in infos[0]["losses"].items()}
    assert set(losses) == set(c3po.PAPER_ALPHAS)
    assert infos[0]["alpha"] == min(sorted(losses, reverse=True), key=lambda a: losses[a])
    # alpha = 1 scores the prompt exactly as the baseline does
    base = c3po.prompt_pass(model, _ids(model, [PROMPTS[2]]), need_loss=True)["loss"][0]
    assert losses[1.0] == pytest.approx(float(base), rel=1e-6)


# -- generation: alpha = 1 is the baseline; the released variant at every generated token -----------

def test_alpha_one_gives_exactly_the_baseline_outputs(model):
    ref = _reference(model, PROMPTS[:2])
    engine = c3po.C3PO(model, ref, c3po.C3POOptions(k=2, alphas=(1.0,)))
    ids = _ids(model)
    r, _ = engine.plan(PROMPTS, ids)
    assert (r.alpha == 1).all() and (r.target[:, -1] != 0).any()
    base = rewire_jax.generate(model, ids, 10, eos_token_id=None)
    ours = rewire_jax.generate(model, ids, 10, eos_token_id=None, route=r)
    assert ours.tokens == base.tokens
    reqs = [backend_lib.Request(tuple(t), 10) for t in ids]
    run = backend_lib.generate_backend(model, batch_size=2)    # the queue: rows refilled with their override
    a = run(reqs, rewire=None, sampling=rewire_jax.Sampling(), seed=0)
    b = run(reqs, rewire=None, sampling=rewire_jax.Sampling(), seed=0, route=r)
    assert [o.text for o in a] == [o.text for o in b]


def _rollout(model, prompt, n, r):
    """Greedy tokens by teacher-forced forwards with the override (one padded length: causal)."""
    f = jax.jit(forward, static_argnames=("cfg",))
    ids, T = list(prompt), len(prompt) + n
    for _ in range(n):
        logits, _ = f(model.params, jnp.asarray([ids + [0] * (T - len(ids))]), zero_deltas(model.config, 1),
                      model.config, route=RouteOverride(*(jnp.asarray(a) for a in r)))
        ids.append(int(np.argmax(np.asarray(logits)[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_released_variant_reroutes_every_generated_token(model):
    cfg = model.config
    ref = _reference(model, PROMPTS[:2])
    opts = c3po.C3POOptions(variant="released", layers=2)
    assert opts.k == 3 and opts.kernel == "cosine" and opts.alphas == (0.0,) and opts.scope == "last"
    ids = _ids(model, PROMPTS[2:])
    r, infos = c3po.C3PO(model, ref, opts).plan(PROMPTS[2:], ids)
    P, n = len(ids[0]), 12
    out = rewire_jax.generate(model, ids, n, eos_token_id=None, route=r)
    gen = out.tokens[0]
    # the decode loop applies the override exactly as a teacher-forced forward with it does
    assert gen == _rollout(model, ids[0], n, r)
    # routing of prompt + generated tokens: at the critical layers from the last prompt token on,
    # the experts are the top-k of omega_hat; before it, and at the other layers, the router's own
    seq = jnp.asarray([ids[0] + gen[:-1]])
    _, aux = forward(model.params, seq, zero_deltas(cfg, 1), cfg, route=RouteOverride(*(jnp.asarray(a) for a in r)))
    _, aux0 = forward(model.params, seq, zero_deltas(cfg, 1), cfg)
    idx, idx0 = np.asarray(aux["idx"][0]), np.asarray(aux0["idx"][0])
    k = cfg.num_experts_per_tok
    top = np.sort(np.argsort(-r.target[0, -2:], -1)[:, :k], -1)               # [2, k]
    assert (np.sort(idx[-2:, P - 1:], -1) == top[:, None]).all()
    np.testing.assert_array_equal(idx[-2:, :P - 1], idx0[-2:, :P - 1])
    np.testing.assert_array_equal(idx[:-2], idx0[:-2])
    assert (np.sort(idx0[-2:, P - 1:], -1) != top[:, None]).any()            # it did change the routing


def test_queue_rows_take_their_prompts_override(model):
    """generate_queue (the harness's backend) with 2 rows for 3 prompts: each prompt's tokens are
    what generate gives it alone with its own override (rows refilled with the next prompt's)."""
    ref = _reference(model, PROMPTS[:2])
    ids = _ids(model)
    r, _ = c3po.C3PO(model, ref, c3po.C3POOptions(variant="released", k=2)).plan(PROMPTS, ids)
    q = rewire_jax.generate_queue(model, ids, 8, batch_size=2, eos_token_id=None, route=r)
    for i in range(3):
        alone = rewire_jax.generate(model, [ids[i]], 8, eos_token_id=None,
                                    route=RouteOverride(*(a[i] for a in r)))
        assert q.tokens[i] == alone.tokens[0]


# -- options, storage, embedders -------------------------------------------------------------------

def test_method_and_option_parsing():
    m = parse_method("c3po[variant=released,k=2,layers=4]")
    assert m.name == "c3po[variant=released,k=2,layers=4]" and m.rewire is None
    assert (m.c3po.variant, m.c3po.k, m.c3po.layers, m.c3po.alphas) == ("released", 2, 4, (0.0,))
    assert parse_method("c3po").c3po == c3po.C3POOptions()
    assert parse_method("c3po[alphas=0/0.5/1,kernel=cosine]").c3po.alphas == (0.0, 0.5, 1.0)
    assert parse_method("sc:2+c3po").sc == 2
    for bad in ("c3po+rewire", "c3po[variant=other]", "c3po[nope=1]", "c3po[scope=last]", "c3po[alphas=2]"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_reference_storage_round_trip(tmp_path, model):
    ref = _reference(model, PROMPTS[:2])
    ref.save(tmp_path)
    back = c3po.Reference.load(tmp_path)
    np.testing.assert_array_equal(back.pathways, ref.pathways)
    assert (back.ids, back.texts, back.problem_ids, back.meta) == (ref.ids, ref.texts, ref.problem_ids, ref.meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [c3po.REFERENCE_SUMMARY, c3po.REFERENCE_FILE]
    np.testing.assert_allclose(back.pathways.sum(-1), 1.0, rtol=1e-5)      # softmax over E at the last token
    with pytest.raises(FileNotFoundError, match="c3po-reference"):
        c3po.Reference.load(tmp_path / "missing")


def test_embedders_model_default_and_optional_sentence_transformers(model, monkeypatch):
    emb = c3po.make_embedder(model, "model")(PROMPTS, _ids(model))
    assert emb.shape == (3, model.config.hidden_size) and np.isfinite(emb).all()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)         # not installed
    with pytest.raises(ImportError, match="sentence-transformers"):
        c3po.make_embedder(model, "st")
    seen = {}

    class FakeST:
        def __init__(self, name):
            seen["name"] = name

        def encode(self, texts, convert_to_numpy=True):
            return np.asarray([[len(t), 1.0] for t in texts])
    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeST))
    out = c3po.make_embedder(model, "st")(["ab", "abc"], [[1], [2]])
    assert seen["name"] == c3po.ST_DEFAULT and out.tolist() == [[2, 1], [3, 1]]
    c3po.make_embedder(model, "st:my-model")
    assert seen["name"] == "my-model"


# -- the harness: eval c3po-reference (resumable) and eval --methods baseline,c3po,...,rewire ---------

def _ref_args(out, *extra):
    return ["eval", "c3po-reference", "--task", "humaneval", "--source-task", "humaneval",
            "--source", str(FIX / "c3po_reference_source.jsonl"), "--max-refs", "4", "--max-new-tokens", "8",
            "--batch-size", "4", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("c3po_ref")
    assert cli.main(_ref_args(out)) == 0
    return out


def test_reference_keeps_correct_answers_with_their_pathways(reference_dir, model):
    recs = read_records(reference_dir / "samples.jsonl")
    correct = {r["problem_id"] for r in recs if r["correct"]}
    assert {r["method"] for r in recs} == {"baseline"} and 0 < len(correct) < len(recs)
    ref = c3po.Reference.load(reference_dir)
    assert 0 < len(ref.problem_ids) <= 4 and set(ref.problem_ids) <= correct
    assert ref.pathways.shape == (len(ref.problem_ids), *model.config.delta_shape)
    by_id = {r["problem_id"]: r for r in recs}
    assert ref.texts == [by_id[p]["prompt"] for p in ref.problem_ids]
    np.testing.assert_allclose(ref.pathways, c3po.prompt_pass(model, ref.ids)["pathway"], rtol=1e-5, atol=1e-7)
    meta = json.loads((reference_dir / c3po.REFERENCE_SUMMARY).read_text())
    assert meta["source_task"] == "humaneval" and meta["count"] == len(ref.problem_ids)


def test_reference_build_is_resumable(reference_dir, tmp_path):
    out = tmp_path / "ref"
    assert cli.main(_ref_args(out, "--stop-after-batches", "1")) == 3     # "killed" after one batch
    assert 0 < len(read_records(out / "samples.jsonl")) < 8 and not (out / c3po.REFERENCE_FILE).exists()
    assert cli.main(_ref_args(out)) == 0
    a, b = c3po.Reference.load(out), c3po.Reference.load(reference_dir)
    assert a.problem_ids == b.problem_ids and a.ids == b.ids
    np.testing.assert_array_equal(a.pathways, b.pathways)
    strip = lambda rs: sorted((r["problem_id"], r["completion"], r["correct"]) for r in rs)
    assert strip(read_records(out / "samples.jsonl")) == strip(read_records(reference_dir / "samples.jsonl"))


METHODS = "baseline,c3po,c3po[variant=released],rewire"


def test_eval_runs_c3po_variants_with_baseline_and_rewire(reference_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--tasks", f"humaneval={FIX / 'c3po_task.jsonl'}", "--methods", METHODS,
            "--c3po-reference", str(reference_dir), "--max-new-tokens", "8", "--interval", "8", "--batch-size", "4",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    recs = read_records(out / "samples.jsonl")
    assert len(recs) == 4 * 4
    by = {}
    for r in recs:
        by.setdefault(r["method"], []).append(r)
    assert all("c3po" not in r for m in ("baseline", "rewire") for r in by[m])
    ref_ids = set(c3po.Reference.load(reference_dir).problem_ids)
    for m, alphas in (("c3po", set(c3po.PAPER_ALPHAS)), ("c3po[variant=released]", {0.0})):
        for r in by[m]:
            info = r["c3po"]
            assert set(info["neighbours"]) <= ref_ids and len(info["neighbours"]) == min(3, len(ref_ids))
            assert info["alpha"] in alphas
        base_flops = {r["problem_id"]: r["flops"] for r in by["baseline"]}
        assert all(r["flops"] > base_flops[r["problem_id"]] for r in by[m])   # + the embedding / alpha passes
    assert all(len(r["c3po"]["losses"]) == 5 for r in by["c3po"])
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]["humaneval"]) == set(METHODS.split(","))
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS.split(","))
    assert cli.main(args) == 0 and len(read_records(out / "samples.jsonl")) == 16      # a rerun: nothing to do
    missing = ["eval", "--tasks", f"humaneval={FIX / 'c3po_task.jsonl'}", "--methods", "c3po", "--limit", "1",
               "--no-progress", "--out", str(tmp_path / "noref")]
    assert cli.main(missing) == 2 and "--c3po-reference" in capsys.readouterr().err
