"""Harness settings of paper Sec. 6.5 / App. C: the colon method syntax, shifted demonstrations
(shift:K), sample diversity (Table 6) and the Fig. 4 / Fig. 6 plots. No model: the runner runs on a
stub tokenizer and a scripted backend."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rewire_jax import RewireOptions, cli
from rewire_jax.eval import diversity, plots
from rewire_jax.eval.backend import Completion
from rewire_jax.eval.cli import _split_methods
from rewire_jax.eval.methods import parse_method
from rewire_jax.eval.report import summarize, write_report
from rewire_jax.eval.runner import EvalConfig, append_records, read_records, run_eval
from rewire_jax.eval.tasks import demo_prompt, get_task, load_shift_pools, pick_shift_demos, shift_tasks

FIX = Path(__file__).parent / "fixtures" / "eval"
SOURCES = {"mbpp": str(FIX / "mbpp_prompt_small.jsonl"), "math500": str(FIX / "math_small.jsonl"),
           "mmlu_redux": str(FIX / "mmlu_redux_small.jsonl"), "gsm8k": str(FIX / "gsm8k_small.jsonl")}


# -- method syntax ---------------------------------------------------------------------------------

def test_colon_form_equals_bracket_form():
    base = RewireOptions(interval=8)
    for opts in ("interval=96", "selection=hard,ratio=0.25", "continuous=false,steps=3"):
        assert parse_method(f"rewire:{opts}", base).rewire == parse_method(f"rewire[{opts}]", base).rewire
    m = parse_method("sc:3+rewire:selection=hard,ratio=0.25", base)
    assert (m.sc, m.rewire.selection, m.rewire.ratio, m.rewire.interval) == (3, "hard", 0.25, 8)
    assert parse_method("rewire:interval=96+icl:2").icl == 2
    s = parse_method("shift:2+rewire")
    assert (s.shift, s.icl, s.rewire) == (2, 0, RewireOptions())
    assert parse_method("shift:3").rewire is None
    for bad, msg in [("rewire:", "bad rewire part"), ("rewire:nope=1", "bad rewire option"),
                     ("rewire:interval=x", "invalid literal"), ("rewire:selection=hrd", "selection"),
                     ("shift:0", "k must be >= 1"), ("icl:1+shift:1", "exclude each other"),
                     ("shift:two", "unknown method part")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)


def test_split_methods_colon_options_continue_the_method():
    assert _split_methods("baseline,rewire:selection=hard,ratio=0.25,icl:2") == [
        "baseline", "rewire:selection=hard,ratio=0.25", "icl:2"]
    assert _split_methods("sc:3+rewire:interval=96,steps=3,shift:1+rewire,rewire[ratio=0.5,steps=2]") == [
        "sc:3+rewire:interval=96,steps=3", "shift:1+rewire", "rewire[ratio=0.5,steps=2]"]
    assert _split_methods("rewire:interval=96,rewire:interval=160") == ["rewire:interval=96", "rewire:interval=160"]
    # a key=value item continues only a method whose LAST '+' part is a colon-form option list
    for bad, prev in [("baseline,interval=96", "after 'baseline'"), ("ratio=0.5", "is not a method"),
                      ("rewire:interval=96+icl:2,ratio=0.25", "after 'rewire:interval=96+icl:2'"),
                      ("rewire[ratio=0.5],steps=2", "after 'rewire[ratio=0.5]'")]:
        with pytest.raises(ValueError, match=re.escape(prev)):
            _split_methods(bad)


# -- shifted demonstrations -----------------------------------------------------------------------

def test_shift_mapping_is_other_domains():
    for name in ("humaneval", "mbpp", "gsm8k", "math500", "mmlu_redux", "aime24"):
        task = get_task(name)
        foreign = shift_tasks(task)
        assert name not in foreign and len(foreign) == 2
        assert all(get_task(f).kind != task.kind for f in foreign)
    assert shift_tasks(get_task("humaneval")) == ("math500", "mmlu_redux")   # the paper's example


def test_shifted_demos_seeded_from_other_tasks_never_the_problem():
    task = get_task("mbpp")
    pools = load_shift_pools(task, SOURCES)
    assert set(pools) == {"math500", "mmlu_redux"} and len(pools["math500"]) == 4 and len(pools["mmlu_redux"]) == 3
    probs = task.load(SOURCES["mbpp"])
    draws = {}
    for p in probs:
        d = pick_shift_demos(pools, 2, 0, "mbpp", p["id"])
        assert d == pick_shift_demos(pools, 2, 0, "mbpp", p["id"])          # deterministic
        assert sorted(n for n, _ in d) == ["math500", "mmlu_redux"]         # the two pools take turns
        assert all(demo in pools[n] for n, demo in d)
        draws[p["id"]] = [(n, demo["id"]) for n, demo in d]
        text = demo_prompt(task, p, shift=2, shift_pools=pools, seed=0)
        own = task.prompt_fn(p)
        assert text.endswith(own) and p["text"] not in text[:-len(own)]       # never the problem itself
        for n, demo in d:                                                   # each in its own task's format
            assert get_task(n).demo_fn(demo) in text
        assert "[DONE]" not in text[:-len(own)]                             # no aligned (MBPP) demo
    other_seed = {p["id"]: [(n, x["id"]) for n, x in pick_shift_demos(pools, 2, 1, "mbpp", p["id"])] for p in probs}
    assert len({tuple(v) for v in draws.values()} | {tuple(v) for v in other_seed.values()}) > 1   # seeded
    k3 = pick_shift_demos(pools, 3, 0, "mbpp", probs[0]["id"])
    assert len({(n, d["id"]) for n, d in k3}) == 3                          # without replacement
    with pytest.raises(ValueError, match="--icl-source mmlu_redux=FILE"):
        pick_shift_demos(pools, 8, 0, "mbpp", probs[0]["id"])
    with pytest.raises(ValueError, match="other tasks"):
        pick_shift_demos({"mbpp": probs}, 1, 0, "mbpp", probs[0]["id"])


class _Tok:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 for c in text[-64:]]}


class _Model:
    tokenizer, path = _Tok(), "stub"


def _scripted_backend(requests, rewire, sampling, seed):
    """Greedy rows answer '#### 7'; sampled rows write distinct texts (diversity > 0)."""
    texts = ["#### 7" if sampling.temperature == 0 else f"path{i} then #### {i % 2 + 7}"
             for i in range(len(requests))]
    return [Completion(t, False, 3, [], 0.01, 1e9) for t in texts]


def test_runner_shift_prompts_and_diversity_in_report(tmp_path):
    cfg = EvalConfig(model="stub", icl_sources=SOURCES, batch_size=6)
    methods = ["baseline", "shift:1", "shift:2+rewire", "icl:1", "sc:3", "sc:3+rewire:interval=4"]
    run_eval(_Model(), {"gsm8k": SOURCES["gsm8k"]}, methods, tmp_path, cfg, backend=_scripted_backend,
             progress=False)
    recs = read_records(tmp_path / "samples.jsonl")
    base = {r["problem_id"]: r["prompt"] for r in recs if r["method"] == "baseline"}
    for r in recs:
        if r["method"].startswith("shift"):
            head = r["prompt"][:-len(base[r["problem_id"]])]
            assert r["prompt"].endswith(base[r["problem_id"]]) and head
            assert "####" not in head                 # no GSM8K demo: MBPP and MMLU formats only
            assert "[DONE]" in head or "multiple choice" in head
    res = write_report(tmp_path)
    cells = res["tasks"]["gsm8k"]
    assert "diversity" not in cells["baseline"] and "diversity" not in cells["shift:1"]
    for m in ("sc:3", "sc:3+rewire:interval=4"):
        d = cells[m]["diversity"]["tfidf"]
        assert d["problems"] == 5 and 0 < d["mean"] <= 1
    md = (tmp_path / "results.md").read_text()
    assert "## Sample diversity" in md and "| gsm8k | sc:3 | 3 |" in md


# -- diversity --------------------------------------------------------------------------------------

def test_tfidf_diversity_identical_disjoint_and_by_hand():
    assert diversity.tfidf_diversity(["def f(x): return x"] * 4) == pytest.approx(0.0, abs=1e-12)
    assert diversity.tfidf_diversity(["alpha beta", "gamma delta", "epsilon zeta"]) == pytest.approx(1.0)
    # by hand: smoothed idf over 2 documents: apple in both -> 1; banana / cherry -> ln(3/2) + 1
    idf = math.log(3 / 2) + 1
    cos = 1 / (1 + idf ** 2)                 # (1, idf, 0) . (1, 0, idf) / |.|^2
    assert diversity.tfidf_diversity(["apple banana", "apple cherry"]) == pytest.approx(1 - cos, rel=1e-9)
    # three texts: mean over the three pairs
    a, b, c = "apple banana", "apple cherry", "kiwi kiwi"
    idf_a, idf_1 = math.log(4 / 3) + 1, math.log(4 / 2) + 1
    cos_ab = idf_a ** 2 / (idf_a ** 2 + idf_1 ** 2)
    assert diversity.tfidf_diversity([a, b, c]) == pytest.approx(np.mean([1 - cos_ab, 1, 1]), rel=1e-9)
    # texts without a token: two empty = identical, empty vs not = disjoint
    assert diversity.tfidf_diversity(["", "  "]) == 0.0
    assert diversity.tfidf_diversity(["", "", "apple pie"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        diversity.tfidf_diversity(["only one"])


def test_embedding_diversity_and_summary():
    vecs = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [2.0, 2.0]}
    embed = lambda texts: np.array([vecs[t] for t in texts])
    want = np.mean([1.0, 1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)])
    assert diversity.embedding_diversity(["a", "b", "c"], embed) == pytest.approx(want)
    recs = [{"problem_id": p, "sample": s, "completion": t}
            for p, texts in (("p1", ["a", "b", "c"]), ("p2", ["a", "a", "a"])) for s, t in enumerate(texts)]
    recs.append({"problem_id": "p3", "sample": 0, "completion": "a"})     # one sample: no diversity
    out = diversity.summary(recs, embed)
    assert out["embedding"] == pytest.approx({"mean": want / 2, "std": want / 2, "problems": 2})
    assert out["tfidf"]["problems"] == 2
    with pytest.raises(FileNotFoundError, match="never downloads"):
        diversity.load_embedder(str(Path("/nonexistent/codebert")))


# -- plots -------------------------------------------------------------------------------------------

# (method, correct flags of problems p0..p3): scores 0.25 steps, chosen so every curve differs
SYNTH = {"baseline": [1, 0, 0, 0], "rewire": [1, 1, 0, 0], "icl:1": [1, 1, 1, 0], "icl:2": [0, 0, 0, 0],
         "shift:1": [0, 1, 0, 0], "shift:2": [1, 1, 1, 1], "icl:1+rewire": [1, 0, 1, 1],
         "icl:2+rewire": [0, 0, 1, 0], "shift:1+rewire": [0, 0, 0, 0], "shift:2+rewire": [1, 1, 1, 0],
         "rewire:interval=4": [0, 0, 1, 0], "rewire:interval=16": [1, 1, 1, 1],
         "rewire:continuous=false": [0, 1, 1, 1], "rewire:selection=hard": [1, 1, 1, 1], "sc:2": [1, 1, 0, 0]}


def _synthetic_run(path: Path) -> Path:
    recs = [{"task": "gsm8k", "method": m, "problem_id": f"p{i}", "sample": s, "correct": bool(c),
             "answer": "7" if c else "1", "completion": f"answer {s} {m}", "flops": 1e9, "seconds": 0.1,
             "new_tokens": 4}
            for m, flags in SYNTH.items() for i, c in enumerate(flags) for s in range(2 if m == "sc:2" else 1)]
    path.mkdir(parents=True, exist_ok=True)
    append_records(path / "samples.jsonl", recs)
    (path / "config.json").write_text(json.dumps({"rewire": {"interval": 8}}))
    return path


def test_plot_series_and_files(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    res, base = plots.run_summary(run)
    assert base == RewireOptions(interval=8)
    pct = lambda m: 100 * sum(SYNTH[m]) / 4
    cs = plots.context_shift_series(res)["gsm8k"]
    assert cs["Base-Aligned"] == [(0, pct("baseline")), (1, pct("icl:1")), (2, pct("icl:2"))]
    assert cs["Base-Shifted"] == [(0, pct("baseline")), (1, pct("shift:1")), (2, pct("shift:2"))]
    assert cs["Ours-Aligned"] == [(0, pct("rewire")), (1, pct("icl:1+rewire")), (2, pct("icl:2+rewire"))]
    assert cs["Ours-Shifted"] == [(0, pct("rewire")), (1, pct("shift:1+rewire")), (2, pct("shift:2+rewire"))]
    iv = plots.interval_series(res, base)["gsm8k"]   # rewire:selection=hard and sc:2 are not interval points
    assert iv == {"baseline": pct("baseline"), "none": pct("rewire:continuous=false"),
                  "rewire": [(4, pct("rewire:interval=4")), (8, pct("rewire")), (16, pct("rewire:interval=16"))]}
    for kind, fn in (("context-shift", plots.plot_context_shift), ("interval", plots.plot_interval)):
        out = tmp_path / f"{kind}.png"
        fn(run, out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
        cli_out = tmp_path / f"cli-{kind}.png"
        assert cli.main(["eval", "plot", str(run), "--kind", kind, "--out", str(cli_out)]) == 0
        assert cli_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(tmp_path):
    res = summarize([{"task": "gsm8k", "method": "sc:2", "problem_id": "p", "sample": s, "correct": True,
                      "answer": "1", "completion": "x y", "flops": 1.0, "seconds": 1.0, "new_tokens": 1}
                     for s in range(2)])
    assert plots.context_shift_series(res) == {} and plots.interval_series(res, RewireOptions()) == {}
    with pytest.raises(ValueError, match="no context-shift methods"):
        plots.plot_context_shift(series={})
    with pytest.raises(ValueError, match="no interval-sweep methods"):
        plots.plot_interval(series={})
    dup = {"tasks": {"t": {"rewire": {"score": 0.5}, "rewire:interval=128": {"score": 0.5}}}}
    with pytest.raises(ValueError, match="both run interval 128"):
        plots.interval_series(dup, RewireOptions())
