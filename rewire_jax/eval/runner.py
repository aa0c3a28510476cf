"""The evaluation runner: tasks x methods, batched, resumable, sharded, deterministic.

    run_eval(model, {"humaneval": None, "gsm8k": "small.jsonl"}, ["baseline", "rewire"], "runs/x")

Every finished sample is appended at once (flushed, fsynced) to RUN_DIR/samples.jsonl (or
samples.shard{i}of{n}.jsonl): one JSON record per line,

    {"task", "method", "problem_id", "sample", "prompt", "completion", "stopped", "answer", "gold",
     "correct", "result", "new_tokens", "phases": [{"context_len", "loss_before", "loss_after"}],
     "seconds", "flops", "seed", "batch"}

Batches are fixed by the problem list (never by what is already done), so a rerun of the same
command skips every batch whose samples are all written, reruns a partial one whole (the same
seed: the same tokens) and writes only the missing samples: no duplicates, at most the batch in
flight lost. A truncated last line (a kill while writing) is dropped on resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from rewire_jax import RewireOptions, Sampling

from . import backend as backend_lib
from .methods import Method, parse_method
from .sandbox import Limits
from .tasks import demo_prompt, get_task, load_shift_pools

TIMING_FIELDS = ("seconds",)


class SimulatedKill(RuntimeError):
    """Raised by the `stop_after_batches` test hook (a run killed between two batches)."""


def record_key(r: dict) -> tuple:
    return r["task"], r["method"], r["problem_id"], r["sample"]


def samples_file(out_dir: Path, shard: tuple = (0, 1)) -> Path:
    i, n = shard
    return Path(out_dir) / ("samples.jsonl" if n == 1 else f"samples.shard{i}of{n}.jsonl")


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """Records of one JSONL file. A last line that does not parse (a kill mid-write) is ignored,
    and with repair=True cut from the file."""
    if not Path(path).exists():
        return []
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    out, good = [], 0
    for ln in lines:
        if not ln.strip():
            good += len(ln) + 1
            continue
        try:
            out.append(json.loads(ln))
        except ValueError:
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good)
            break
        good += len(ln) + 1
    return out


def append_records(path: Path, records: Sequence[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def batch_seed(seed: int, task: str, method: str, first_id: str) -> int:
    h = hashlib.sha256(f"{seed}/{task}/{method}/{first_id}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def shard_problems(problems: list, shard: tuple) -> list:
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return problems[i::n]


def plan(problems: list, method: Method, batch_size: int) -> list[list]:
    """Fixed batches of problems: batch_size rows, k rows per problem for sc:k."""
    per = max(1, batch_size // method.samples)
    return [problems[j:j + per] for j in range(0, len(problems), per)]


@dataclasses.dataclass
class EvalConfig:
    """Everything that fixes the samples (checked on resume) plus how to run."""

    model: str
    seed: int = 0
    batch_size: int = 16
    limit: Optional[int] = None
    shard: tuple = (0, 1)
    max_new_tokens: dict = dataclasses.field(default_factory=dict)   # task -> budget (else the task's)
    chat: Optional[bool] = None              # None: use the chat template if the tokenizer has one
    sc_temperature: float = 0.7
    sc_top_p: float = 0.95
    rewire: dict = dataclasses.field(default_factory=dict)          # base RewireOptions fields
    sources: dict = dataclasses.field(default_factory=dict)         # task -> local file (or None)
    icl_sources: dict = dataclasses.field(default_factory=dict)
    sandbox_timeout: float = 10.0
    workers: int = 0
    c3po_reference: Optional[dict] = None    # c3po methods: task (or '*') -> reference directory

    def fingerprint(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("workers", "limit", "shard"):
            d.pop(k)
        return json.loads(json.dumps(d))


def _check_config(out_dir: Path, cfg: EvalConfig) -> None:
    path = out_dir / "config.json"
    fp = cfg.fingerprint()
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ValueError(f"{out_dir} holds a run with different settings ({', '.join(diff)}); "
                             f"use another --out or the same options")
    else:
        path.write_text(json.dumps(fp, indent=1))


def _records(task, method, probs, prompts, outs, scores, seed, batch_index):
    recs, row = [], 0
    for p, prompt in zip(probs, prompts):
        for s in range(method.samples):
            o, sc = outs[row], scores[row]
            recs.append({"task": task.name, "method": method.name, "problem_id": p["id"], "sample": s,
                         "prompt": prompt, "completion": o.text, "stopped": o.stopped, "answer": sc["answer"],
                         "gold": p["gold"], "correct": sc["correct"], "result": sc["result"],
                         "new_tokens": o.new_tokens, "phases": o.phases, "seconds": o.seconds,
                         "flops": o.flops, "seed": seed, "batch": batch_index})
            row += 1
    return recs


def run_eval(model, tasks: dict, methods: Sequence[str], out_dir, cfg: EvalConfig, backend=None,
             progress: bool = True, stop_after_batches: Optional[int] = None) -> Path:
    """Run (or resume) an evaluation; returns the samples file. tasks: name -> source (None: the
    task's default data). backend: requests -> completions (default: `generate_backend(model)`)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, cfg)
    path = samples_file(out_dir, cfg.shard)
    done = {record_key(r) for r in read_records(path, repair=True)}
    backend = backend or backend_lib.generate_backend(model)
    base = RewireOptions(**cfg.rewire)
    meths = [parse_method(m, base) for m in methods]
    chat = backend_lib.has_chat_template(model) if cfg.chat is None else cfg.chat
    limits = Limits(timeout_s=cfg.sandbox_timeout, cpu_s=int(cfg.sandbox_timeout) + 1)
    work, shift_pools = [], {}
    for name, source in tasks.items():
        task = get_task(name)
        probs = shard_problems(task.load(source or cfg.sources.get(name), cfg.limit), cfg.shard)
        pool = task.load_icl(cfg.icl_sources.get(name)) if any(m.icl for m in meths) else []
        if any(m.shift for m in meths):   # shift:K: the other tasks' ICL pools (context shift)
            shift_pools[name] = load_shift_pools(task, cfg.icl_sources)
        for m in meths:
            work += [(task, m, pool, b, i) for i, b in enumerate(plan(probs, m, cfg.batch_size))]
    total = sum(len(b) * m.samples for _, m, _, b, _ in work)
    bar = tqdm(total=total, initial=min(len(done), total), desc="eval", unit="sample", disable=not progress,
               dynamic_ncols=True)
    ran, c3po_engines = 0, {}
    for task, m, pool, probs, bi in work:
        keys = [(task.name, m.name, p["id"], s) for p in probs for s in range(m.samples)]
        if all(k in done for k in keys):
            continue
        bar.set_postfix_str(f"{task.name} {m.name}")
        prompts = [demo_prompt(task, p, m.icl, m.shift, pool, shift_pools.get(task.name), cfg.seed) for p in probs]
        budget = cfg.max_new_tokens.get(task.name, task.max_new_tokens)
        stops = () if chat and task.kind == "code" else task.stops
        reqs = [backend_lib.Request(tuple(backend_lib.encode_prompt(model, t, chat)), budget, stops)
                for t in prompts for _ in range(m.samples)]
        sampling = Sampling(cfg.sc_temperature, 0, cfg.sc_top_p) if m.sc else Sampling()
        seed = batch_seed(cfg.seed, task.name, m.name, probs[0]["id"])
        route = c3po_info = None
        if m.c3po is not None:   # C3PO: the re-mixed routing of each prompt (eval/c3po.py)
            from . import c3po as c3po_lib
            route, c3po_info = c3po_lib.plan_requests(model, m.c3po, task.name, cfg.c3po_reference, prompts, reqs,
                                                      m.samples, c3po_engines)
        extra = {} if route is None else {"route": route}
        outs = backend(reqs, rewire=m.rewire, sampling=sampling, seed=seed, **extra)
        rows = [p for p in probs for _ in range(m.samples)]
        scores = task.score(rows, [o.text for o in outs], chat, limits, cfg.workers)
        recs = _records(task, m, probs, prompts, outs, scores, seed, bi)
        if c3po_info is not None:
            c3po_lib.annotate(recs, c3po_info, m.samples)
        recs = [r for r in recs if record_key(r) not in done]
        append_records(path, recs)
        done.update(record_key(r) for r in recs)
        bar.update(len(recs))
        ran += 1
        if stop_after_batches is not None and ran >= stop_after_batches:
            bar.close()
            raise SimulatedKill(f"stopped after {ran} batches (test hook)")
    bar.close()
    return path
