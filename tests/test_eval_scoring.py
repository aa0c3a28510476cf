"""Answer extraction (with traps), math-verify, estimators, statistics, methods, report and merge."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rewire_jax import RewireOptions
from rewire_jax.eval import extract as ex
from rewire_jax.eval import metrics
from rewire_jax.eval.cli import _kv_list, _split_methods
from rewire_jax.eval.methods import parse_method
from rewire_jax.eval.report import merge, summarize, write_report
from rewire_jax.eval.runner import append_records, plan, read_records, shard_problems
from rewire_jax.eval.tasks import get_task, pick_demos

FIX = Path(__file__).parent / "fixtures" / "eval"


@pytest.mark.parametrize("text,want", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1234"),                                   # thousands separator
    ("So the total is $1,234.50.", "1234.5"),
    ("The answer is 42 apples.", "42"),                       # trailing unit
    ("The answer is: 7 cm. Next we check 9.", "7"),
    ("First 5, then 10, finally 18 km", "18"),                # last number when nothing else
    ("Therefore \\boxed{36} is it, not 40", "36"),
    ("It is -3.", "-3"),
    ("no number here", None),
])
def test_gsm8k_number_extraction(text, want):
    assert ex.extract_number(text) == want


def test_gsm8k_gold_and_equality():
    assert ex.gsm8k_gold("... so 1,000 left.\n#### 1,000") == "1000"
    assert ex.numbers_equal("1000", "1000") and ex.numbers_equal("12.0", "12")
    assert not ex.numbers_equal("12", "13") and not ex.numbers_equal(None, "1")


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),            # nested braces kept
    ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),   # the last one
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{unclosed", None),
])
def test_last_boxed(text, want):
    assert ex.last_boxed(text) == want


@pytest.mark.parametrize("completion,gold,ok", [
    ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("so we get \\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("the result is \\boxed{2x+1}", "1+2x", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{1,234}", "1234", True),                         # thousands separator
    ("first \\boxed{3} but finally \\boxed{4}", "3", False),   # the last box counts
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("no answer at all", "5", False),
])
def test_math_verify(completion, gold, ok):
    assert ex.math_equal(completion, gold)[0] is ok


@pytest.mark.parametrize("text,want", [
    ("A good approach is to compare. The answer is (C).", "C"),    # a letter in prose before
    ("B is tempting, but the answer is D", "D"),
    ("Answer: B", "B"),
    ("I think (A) is wrong and (B) too. So (C)", "C"),
    ("\\boxed{A}", "A"),
    ("D. Because mitochondria...", "D"),
    ("A cat is an animal.", None),                             # prose only: no answer
    ("the answer is (E)", None),                               # not one of A-D
])
def test_choice_extraction(text, want):
    assert ex.extract_choice(text) == want


@pytest.mark.parametrize("text,want", [
    ("so m+n = \\boxed{033}", 33),
    ("\\boxed{\\text{204}}", 204),
    ("The answer is 1,000? no: \\boxed{999}", 999),
    ("answer is 17.", 17),
    ("we get 12 and then 25", 25),
    ("\\boxed{\\frac{1}{2}} hmm 7", None),                     # a non-integer box: no integer answer
    ("\\boxed{1,000}", 1000),
    ("nothing", None),
])
def test_aime_integer_extraction(text, want):
    assert ex.extract_integer(text) == want


def test_stop_strings_and_code_block():
    assert ex.truncate_at_stop("    return x\n\ndef g():\n    pass", ["\ndef ", "\nclass "]) == ("    return x\n", True)
    assert ex.truncate_at_stop("abc", ["\ndef "]) == ("abc", False)
    assert ex.truncate_at_stop("a\nclass B\ndef", ["\ndef", "\nclass"]) == ("a", True)   # earliest wins
    assert ex.code_block("Sure!\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def test_pass_at_k_equals_closed_form():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                # = the fraction of k-subsets holding a correct sample
                subs = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert metrics.pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subs]), abs=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(2, 1, 3)


def test_maj_at_k():
    ans, cor = ["5", "5", "7", None], [True, True, False, False]
    assert metrics.maj_at_k(ans, cor, 1) == pytest.approx(0.5)
    # k=2: subsets {55}:1, {57}x2: tie -> 1/2 each, {5,None}x2: 1, {7,None}: 0, -> (1 + 0.5*2 + 2) / 6
    assert metrics.maj_at_k(ans, cor, 2) == pytest.approx(4 / 6)
    assert metrics.maj_at_k(ans, cor, 4) == pytest.approx(1.0)
    assert metrics.maj_at_k(["1", "2", "2"], [True, False, False], 3) == 0.0
    assert ex.majority(["2", None, "3", "3", "2"]) == "2" and ex.majority([None]) is None
    # Monte-Carlo branch agrees with the exact one
    rng = np.random.default_rng(0)
    a = [str(x) for x in rng.integers(0, 3, 12)]
    c = [x == "1" for x in a]
    assert metrics.maj_at_k(a, c, 5, max_subsets=100000) == pytest.approx(
        metrics.maj_at_k(a, c, 5, max_subsets=300), abs=0.08)


def test_intervals_and_paired_test():
    lo, hi = metrics.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert metrics.mean_ci([0.5, 1.0, 0.0, 0.5])[0] < 0.5 < metrics.mean_ci([0.5, 1.0, 0.0, 0.5])[1]
    st = metrics.sign_test([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)   # 10 wins, 0 losses
    assert st["better"] == 10 and st["worse"] == 0 and st["p"] == pytest.approx(2 / 2 ** 10)
    assert metrics.sign_test([1, 0, 1], [1, 0, 1])["p"] == 1.0
    assert metrics.sign_test([1, 0], [0, 1])["p"] == 1.0


def test_method_parsing():
    m = parse_method("sc:3+rewire[selection=hard,continuous=false]", RewireOptions(interval=8))
    assert (m.sc, m.icl, m.samples) == (3, 0, 3)
    assert m.rewire.selection == "hard" and m.rewire.continuous is False and m.rewire.interval == 8
    assert parse_method("baseline").rewire is None and parse_method("icl:2").rewire is None
    assert parse_method("rewire[selection=none]").rewire is None
    assert parse_method("icl:3+rewire").icl == 3
    for bad in ("bogus", "rewire[nope=1]", "icl:0", "rewire[continuous=maybe]", "rewire[selection=hrd]"):
        with pytest.raises(ValueError):
            parse_method(bad)
    assert _split_methods("baseline,rewire[selection=hard,ratio=0.25],sc:3+rewire") == [
        "baseline", "rewire[selection=hard,ratio=0.25]", "sc:3+rewire"]
    assert _kv_list("humaneval,gsm8k=a.jsonl", "x") == {"humaneval": None, "gsm8k": "a.jsonl"}


def test_tasks_load_local_files_and_score():
    g = get_task("gsm8k")
    probs = g.load(str(FIX / "gsm8k_small.jsonl"))
    assert [p["gold"] for p in probs] == ["7", "60", "1000", "7", "180"]
    out = g.score(probs[:3], ["... #### 7", "I think 61", "That leaves $1,000."])
    assert [o["correct"] for o in out] == [True, False, True]
    m = get_task("math500")
    mp = m.load(str(FIX / "math_small.jsonl"))
    assert len(mp) == 4 and m.score(mp[:1], ["so \\boxed{\\frac{1}{2}}"])[0]["correct"]
    mm = get_task("mmlu_redux")
    rows = mm.load(str(FIX / "mmlu_redux_small.jsonl"))
    assert [p["gold"] for p in rows] == ["B", "D"]   # the row annotated wrong_groundtruth is skipped
    assert "Question:" in mm.prompt(rows[0]) and "B. " in mm.prompt(rows[0])
    a = get_task("aime24")
    ap = a.load(str(FIX / "aime_small.jsonl"))
    assert a.score(ap, ["\\boxed{033}", "\\boxed{5}"])[0]["correct"] and not a.score(ap[1:], ["7"])[0]["correct"]
    mb = get_task("mbpp")
    mbp = mb.load(str(FIX / "mbpp_prompt_small.jsonl"))
    got = mb.score(mbp, [p["code"] for p in mbp[:3]] + ["def max_of_two(a, b):\n    return a"])
    assert [g["correct"] for g in got] == [True, True, True, False]
    # demonstrations: seeded, never the problem itself, stable
    d1 = pick_demos(probs, 2, 0, "gsm8k", "g1")
    assert [d["id"] for d in d1] == [d["id"] for d in pick_demos(probs, 2, 0, "gsm8k", "g1")]
    assert "g1" not in [d["id"] for d in d1]
    with pytest.raises(ValueError):
        pick_demos(probs, 5, 0, "gsm8k", "g1")
    he = get_task("humaneval").load(limit=2)
    assert he[0]["id"] == "HumanEval/0" and "def " in get_task("humaneval").prompt(he[0], mbp[:1])


def test_plan_and_shards():
    probs = [{"id": str(i)} for i in range(7)]
    assert [len(b) for b in plan(probs, parse_method("baseline"), 3)] == [3, 3, 1]
    assert [len(b) for b in plan(probs, parse_method("sc:3"), 6)] == [2, 2, 2, 1]
    shards = [shard_problems(probs, (i, 3)) for i in range(3)]
    assert sorted(p["id"] for s in shards for p in s) == [p["id"] for p in probs]
    with pytest.raises(ValueError):
        shard_problems(probs, (3, 3))


def _rec(task, method, pid, correct, sample=0, answer=None, flops=1e9):
    return {"task": task, "method": method, "problem_id": pid, "sample": sample, "correct": correct,
            "answer": answer, "flops": flops, "seconds": 0.5, "new_tokens": 10, "completion": "x"}


def test_report_and_merge(tmp_path):
    recs = [_rec("gsm8k", "baseline", str(i), i < 4) for i in range(10)]
    recs += [_rec("gsm8k", "rewire", str(i), i < 7, flops=3e9) for i in range(10)]
    recs += [_rec("gsm8k", "sc:3", str(i), c, s, a) for i in range(10)
             for s, (a, c) in enumerate([("1", True), ("1", True), ("2", False)] if i < 5 else
                                        [("2", False), ("2", False), ("1", True)])]
    res = summarize(recs)
    cell = res["tasks"]["gsm8k"]["rewire"]
    assert cell["score"] == pytest.approx(0.7) and cell["vs_baseline"]["better"] == 3
    assert cell["vs_baseline"]["p"] == pytest.approx(0.25)
    sc = res["tasks"]["gsm8k"]["sc:3"]
    assert sc["score"] == pytest.approx(0.5) and sc["samples_per_problem"] == 3
    assert sc["pass@1"] == pytest.approx(0.5) and "maj@2" in sc
    assert res["cost"]["rewire"]["gflops_per_sample"] == pytest.approx(3.0)
    # shards -> merge -> the same report; duplicates kept once, conflicts refused
    for i in range(2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        append_records(d / f"samples.shard{i}of2.jsonl", [r for j, r in enumerate(recs) if j % 2 == i])
    append_records(tmp_path / "s1" / "samples.shard1of2.jsonl", recs[:1])   # a duplicate of shard 0's
    merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    assert len(read_records(tmp_path / "m" / "samples.jsonl")) == len(recs)
    out = write_report(tmp_path / "m")
    assert out["tasks"] == res["tasks"]
    md = (tmp_path / "m" / "results.md").read_text()
    assert "| rewire | 70.00 [" in md and "p=0.25" in md and "GFLOPs" in md
    append_records(tmp_path / "s1" / "samples.shard1of2.jsonl", [dict(recs[0], correct=not recs[0]["correct"])])
    with pytest.raises(ValueError, match="conflicting"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m2")


def test_truncated_last_line_is_repaired(tmp_path):
    p = tmp_path / "samples.jsonl"
    append_records(p, [{"a": 1}, {"a": 2}])
    with open(p, "a") as f:
        f.write('{"a": 3, "trunc')
    assert read_records(p) == [{"a": 1}, {"a": 2}]
    assert read_records(p, repair=True) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n"
