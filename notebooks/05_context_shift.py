# %% [markdown]
# # Context shift (Fig. 4), interval sweep (Fig. 6) and sample diversity (Table 6) with the harness
#
# The evaluation harness (`rewire-jax eval`) on the bundled demo model, offline and tiny, so that
# the notebook runs in a few minutes on a CPU. The same runs from the command line:
#
# ```bash
# rewire-jax eval --tasks humaneval=FILE --methods baseline,rewire,icl:1,shift:1,shift:1+rewire,... \
#     --icl-source humaneval=MBPP.jsonl,math500=MATH.jsonl,mmlu_redux=MMLU.jsonl --out RUN
# rewire-jax eval plot RUN --kind context-shift --out fig4.png
# rewire-jax eval plot RUN --kind interval --out fig6.png
# ```
#
# **The task.** The 4.5M-parameter demo model (trained on the Python standard library) cannot
# solve a real benchmark problem, so the task here is a handful of synthetic HumanEval-format
# problems that ask it to finish the last line of a one-line function (`return a +` ...), scored
# by the harness as HumanEval is: prompt + completion (cut at the HumanEval stop strings) + tests
# in the sandbox. The numbers show the machinery (prompts, runs, tables, figures) on a model that
# gets some of these right, not the paper's effect sizes.
#
# **Demonstrations.** `icl:k` (aligned): k code demonstrations from the task's ICL pool (MBPP
# format for HumanEval; the MBPP fixture file); `shift:k` (shifted): k demonstrations from the
# other domains' pools, for a code task MATH and MMLU (each in its own task's format), seeded per
# problem. Both with and without `+rewire`.
#
# **Sizes.** The next cell (tagged `parameters`) sets the run's size; `tests/test_notebooks.py`
# runs the notebook with smaller values put after it.

# %% tags=["parameters"]
num_problems = 6       # synthetic problems (of the 6 below)
K = (1, 2)             # demonstrations for icl:k (aligned) and shift:k (shifted), besides k = 0
interval = 4           # the run's re-optimisation interval m (tokens)
sweep = (6, 8)         # rewire:interval=M for the interval sweep, besides the run's own m
sc_k = 3               # sampled paths per problem (sc:k, sc:k+rewire)
max_new_tokens = 12

# %%
import os

# faster XLA compilation on CPU (this notebook compiles many small programs and runs each briefly)
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import json
import tempfile
from pathlib import Path

from IPython.display import Image, Markdown, display

import rewire_jax
from rewire_jax.cli import DEMO_MODEL
from rewire_jax.eval import plots
from rewire_jax.eval.backend import generate_backend
from rewire_jax.eval.report import markdown, write_report
from rewire_jax.eval.runner import EvalConfig, run_eval

FIX = Path("../tests/fixtures/eval").resolve()
PROBLEMS = [("add", "a, b", "return a +", "candidate(2, 3) == 5"),
            ("is_empty", "items", "return len(items) ==", "candidate([]) and not candidate([1])"),
            ("first", "items", "return items[", "candidate([4, 5]) == 4"),
            ("join_words", "words", "return ' '.join(", "candidate(['a', 'b']) == 'a b'"),
            ("last", "items", "return items[-", "candidate([4, 5]) == 5"),
            ("square", "x", "return x *", "candidate(3) == 9")][:num_problems]
tmp = Path(tempfile.mkdtemp())
task_file = tmp / "finish_the_line.jsonl"
task_file.write_text("".join(json.dumps({"task_id": f"Line/{i}", "entry_point": name,
                                         "prompt": f"def {name}({args}):\n    {head}",
                                         "test": f"def check(candidate):\n    assert {test}\n"}) + "\n"
                             for i, (name, args, head, test) in enumerate(PROBLEMS)))
print(task_file.read_text().splitlines()[0])

model = rewire_jax.load(DEMO_MODEL)
# batch_size: every method's problems in one batch (sc:k: k rows per problem)
cfg = EvalConfig(model=str(DEMO_MODEL), max_new_tokens={"humaneval": max_new_tokens}, batch_size=num_problems * sc_k,
                 rewire={"interval": interval}, sandbox_timeout=5.0,
                 icl_sources={"humaneval": str(FIX / "mbpp_prompt_small.jsonl"),
                              "math500": str(FIX / "math_small.jsonl"),
                              "mmlu_redux": str(FIX / "mmlu_redux_small.jsonl")})

# %% [markdown]
# One run, all methods (the sizes of the `parameters` cell): k = 0, 1, 2 (`K`) aligned and shifted
# demonstrations, baseline and rewired (`interval` 4); the interval sweep `rewire:interval=M`
# (M = 4 = the run's default, and `sweep` 6, 8) and `rewire:continuous=false` (one phase on the
# prompt, no updates); and `sc:3` / `sc:3+rewire` (`sc_k` = 3 sampled paths per problem,
# temperature 0.7, top-p 0.95) for the diversity table.

# %%
methods = (["baseline", "rewire"] + [f"{d}:{k}" for d in ("icl", "shift") for k in K]
           + [f"{d}:{k}+rewire" for d in ("icl", "shift") for k in K]
           + [f"rewire:interval={m}" for m in sweep] + ["rewire:continuous=false", f"sc:{sc_k}", f"sc:{sc_k}+rewire"])
run_dir = tmp / "run"
# the lock-step backend: one padded batch per method, so few programs to compile on this tiny run
backend = generate_backend(model, lockstep=True)
run_eval(model, {"humaneval": str(task_file)}, methods, run_dir, cfg, backend=backend, progress=False)
res = write_report(run_dir)
display(Markdown(markdown(res)))

# %% [markdown]
# A shifted prompt: a foreign demonstration (MMLU or MATH format) before the code problem.

# %%
recs = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
print(next(r["prompt"] for r in recs if r["method"] == f"shift:{K[-1]}" and r["problem_id"] == "Line/0"))

# %% [markdown]
# ## Fig. 4: score vs number of demonstrations, aligned vs shifted

# %%
plots.plot_context_shift(run_dir, tmp / "fig4.png")
display(Image(filename=str(tmp / "fig4.png")))

# %% [markdown]
# ## Fig. 6: score vs re-optimisation interval (baseline dashed)

# %%
plots.plot_interval(run_dir, tmp / "fig6.png")
display(Image(filename=str(tmp / "fig6.png")))

# %% [markdown]
# ## Table 6: diversity of the `sc_k` (3) samples per problem
#
# Per problem: the mean over its sample pairs of 1 - cosine similarity of TF-IDF vectors (scikit-learn,
# fitted on that problem's samples); mean ± std over problems. The embedding-based column appears
# when `write_report(run_dir, embed=load_embedder(LOCAL_MODEL_DIR))` (or `rewire-jax eval report RUN
# --embed-model DIR`) is given a local sentence-transformers code model; none is bundled.

# %%
for m in (f"sc:{sc_k}", f"sc:{sc_k}+rewire"):
    d = res["tasks"]["humaneval"][m]["diversity"]["tfidf"]
    print(f"{m:12s} TF-IDF cosine diversity {d['mean']:.3f} ± {d['std']:.3f} over {d['problems']} problems")
