"""The lm-evaluation-harness backend (rewire_jax/eval/lm_eval_backend.py) on the bundled demo model,
offline: its requests against the library's own generate / forward / Rewirer, batched against one at
a time, and lm-eval runs over the local YAML tasks in tests/fixtures/lm_eval (in-process through
`simple_evaluate` and through `rewire-jax lm-eval` in a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import rewire_jax  # noqa: E402
from rewire_jax.cli import DEMO_MODEL  # noqa: E402
from rewire_jax.eval.extract import truncate_at_stop  # noqa: E402
from rewire_jax.eval.lm_eval_backend import RewireLM  # noqa: E402
from rewire_jax.model.transformer import prepare_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# tiny budgets: two Adam steps per phase, a phase every 4 generated tokens; lr 1.0 so that the
# deltas change the demo model's greedy text (checked below)
OPTS = dict(steps=2, interval=4, lr=1.0)
LL = [("import os\nimport", " sys"), ("class Foo(object):\n    def __init__(self", "):\n        pass"),
      ("for i in", " range("), ("", "import os")]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def model():
    return rewire_jax.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def lm(model):
    return RewireLM(model=model, batch_size=2, **OPTS)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _ll(lm, pairs):
    return lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)


def _reference(model, pairs, deltas=None):
    """[(context ids, continuation ids)] -> [(sum of the continuation's log-probs, is greedy)] from
    the logits of `model(tokens, deltas)` (rows right-padded to 16 tokens and 4 rows: one compiled
    forward for the whole module; causal, so the padding cannot reach a scored position)."""
    tokens = np.zeros((4, 16), np.int32)
    for i, (c, t) in enumerate(pairs):
        tokens[i, :len(c) + len(t)] = c + t
    d = None if deltas is None else np.concatenate([deltas, np.zeros((4 - len(deltas), *deltas.shape[1:]))])
    logp = np.asarray(jax.nn.log_softmax(model(tokens, d), axis=-1), np.float64)
    out = []
    for i, (c, t) in enumerate(pairs):
        pos = np.arange(len(c) - 1, len(c) + len(t) - 1)
        out.append((logp[i, pos, tokens[i, pos + 1]].sum(), bool((logp[i, pos].argmax(-1) == tokens[i, pos + 1]).all())))
    return out


def _encode(lm, ctx, cont):
    """The (context ids, continuation ids) lm-eval's TemplateLM.loglikelihood hands the backend."""
    if ctx == "":
        return [lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)
    return lm._encode_pair(ctx, cont)


def test_loglikelihood_equals_forward(lm, model):
    """Rewiring off: each score is the sum of the continuation's log-probs from model(tokens)
    (the longest request also unpadded, as it is)."""
    plain = RewireLM(model=model, batch_size=2, rewire=False)
    got = _ll(plain, LL)
    pairs = [_encode(plain, *p) for p in LL]
    for (lp, greedy), (want_lp, want_greedy) in zip(got, _reference(model, pairs)):
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert any(g for _, g in got) and not all(g for _, g in got)   # both outcomes are exercised
    c, t = pairs[1]
    logp = jax.nn.log_softmax(model(np.asarray(c + t)), axis=-1)[0]
    assert got[1][0] == pytest.approx(float(sum(logp[len(c) - 1 + i, x] for i, x in enumerate(t))), rel=1e-5)


def test_batched_equals_one_at_a_time(lm, model):
    """Padded, bucketed batches (2 rows, 2..15 tokens) score as each request alone, with and
    without rewiring on the context."""
    for rewire in (False, True):
        batched = _ll(RewireLM(model=model, batch_size=2, rewire=rewire, **OPTS), LL)
        single = [_ll(RewireLM(model=model, batch_size=1, rewire=rewire, **OPTS), [p])[0] for p in LL]
        for (b, gb), (s, gs) in zip(batched, single):
            assert b == pytest.approx(s, rel=1e-6, abs=1e-5)
            assert gb == gs


def test_rewired_loglikelihood_uses_context_deltas(lm, model):
    """loglikelihood with rewiring = one phase (Rewirer.step) on the context, then the continuation
    scored by model(tokens, deltas): the same number, and not the plain model's."""
    rw = rewire_jax.Rewirer(model.config, lm.rewire_options)
    params = prepare_params(model.params, model.config)   # what the backend passes (same compiled phase)
    got = _ll(lm, LL)
    pairs = [_encode(lm, *p) for p in LL]
    deltas = np.stack([rw.step(params, jnp.zeros(model.config.delta_shape), np.asarray(c)).deltas
                       if len(c) > 1 else np.zeros(model.config.delta_shape, np.float32) for c, _ in pairs])
    assert (np.abs(deltas[:3]).max(axis=(1, 2)) > 0).all()
    for (lp, greedy), (want_lp, want_greedy) in zip(got, _reference(model, pairs, deltas)):
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    plain = _reference(model, pairs)
    assert max(abs(g[0] - p[0]) for g, p in zip(got, plain)) > 1e-3   # rewiring changed the scores
    assert got[3][0] == pytest.approx(plain[3][0])   # empty context (the prefix token): nothing to optimise on


def test_loglikelihood_rolling(lm, model):
    """One window: log p(text | prefix token); several windows (max_length 8): lm-eval's disjoint
    windows, each scored by the plain forward: never rewired, although `lm` rewires."""
    text = "import os\nimport sys\n\ndef main():\n    return 0\n"
    ids = lm.tok_encode(text)
    [got] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    assert 8 < len(ids) < 16
    assert got == pytest.approx(_reference(model, [([lm.prefix_token_id], ids)])[0][0], rel=1e-5, abs=1e-4)
    short = RewireLM(model=model, batch_size=2, max_length=8, **OPTS)
    [got8] = short.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    windows = list(map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
        ids, lm.prefix_token_id, 8, 1)))
    assert len(windows) == 2 and len(windows[1][0]) > 1
    want8 = sum(lp for lp, _ in _reference(model, windows))
    assert got8 == pytest.approx(want8, rel=1e-5, abs=1e-4)
    assert got8 != pytest.approx(got)   # the second window sees less context


# the first two docs of tests/fixtures/lm_eval/demo_gen.json with its generation_kwargs (the
# simple_evaluate test below then reuses these compiled programs)
GEN = [("import os\nimport", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
       ("    return self.", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})]


def test_generate_until_equals_generate(lm, model):
    """generate_until (batched queue, per-row stops and budgets, a phase every 4 tokens), rewired and
    not == rewire_jax.generate on the same prompts and options, its text cut at the first stop."""
    ids = [lm.tok_encode(p) for p, _ in GEN]
    texts = {}
    for rewire in (True, False):
        gen_lm = lm if rewire else RewireLM(model=model, batch_size=2, rewire=False)
        got = gen_lm.generate_until([_req("generate_until", g, i) for i, g in enumerate(GEN)])
        res = rewire_jax.generate(model, ids, 6, rewire=lm.rewire_options if rewire else None)
        assert len(res.phases) == (2 if rewire else 0)   # on the prompt, and again after 4 tokens
        stopped = []
        for (p, kw), toks, text in zip(GEN, res.tokens, got):
            want, cut = truncate_at_stop(lm.tokenizer.decode(toks, skip_special_tokens=True), kw["until"])
            assert text == want
            stopped.append(cut)
        assert stopped == [True, False]   # the stop string cut the first row; the second ran to its budget
        texts[rewire] = got
    assert texts[True][1] != texts[False][1]   # the rewiring reached the generated text


def test_simple_evaluate_local_tasks(lm):
    """lm_eval.simple_evaluate(model=RewireLM(...)) over the local YAML tasks -> lm-eval's table."""
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    out = lm_eval.simple_evaluate(model=lm, tasks=["rewire_demo_mc", "rewire_demo_gen"], limit=2,
                                  task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    res = out["results"]
    assert 0.0 <= res["rewire_demo_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["rewire_demo_gen"]["exact_match,none"] <= 1.0
    table = make_table(out)
    assert "rewire_demo_mc" in table and "rewire_demo_gen" in table and "exact_match" in table
    assert out["config"]["rewire"]["steps"] == OPTS["steps"]


def test_cli_lm_eval_subprocess():
    """`rewire-jax lm-eval ...` registers the backend and runs lm-eval's CLI: exit 0 and the table."""
    env = {**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "rewire_jax.cli", "lm-eval", "--include_path", str(TASKS),
                        "--tasks", "rewire_demo_mc", "--model", "rewire-jax", "--model_args",
                        "rewire=false,steps=1,dtype=float32,batch_size=2", "--limit", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|rewire_demo_mc|" in r.stdout.replace(" ", "") and "acc" in r.stdout, r.stdout


def test_cli_help_and_errors(capsys, model):
    from rewire_jax.cli import main

    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model rewire-jax" in out and "--model_args" in out and "--tasks" in out
    with pytest.raises(ValueError, match="unknown model_args stepz"):
        RewireLM(model=model, stepz=3)
    with pytest.raises(ValueError, match="selection"):
        RewireLM(model=model, selection="best")
    with pytest.raises(ValueError, match="not supported"):
        RewireLM(model=model).generate_until([_req("generate_until", ("x", {"num_beams": 4}))])


def test_chat_template_hooks(model):
    lm = RewireLM(model=model)
    assert lm.tokenizer_name.endswith("model")
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = model.tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    try:
        chat = [{"role": "user", "content": "hi"}]
        assert lm.apply_chat_template(chat) == "<user>hi<assistant>"
        assert lm.apply_chat_template(chat + [{"role": "assistant", "content": "ok"}],
                                      add_generation_prompt=False).startswith("<user>hi<assistant>ok")
        assert lm.chat_template(True) == tok.chat_template
    finally:
        tok.chat_template = None
