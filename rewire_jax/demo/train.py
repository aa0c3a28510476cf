"""Train the demo MoE: a small OLMoE-architecture LM on the running interpreter's standard library.

    python -m rewire_jax.demo.train --out DIR [--steps N] [--batch-size B] ...

Everything is deterministic given the flags: the tokenizer is trained on the training split
(`demo/corpus.py`), the batch order comes from `demo/data.py` with a fixed seed, and the params
are initialised from a fixed key. The model is the project's own Flax `Transformer`
(`rewire_jax.model`), trained with optax AdamW (linear warmup + cosine decay, global-norm gradient
clipping) on

    loss = next-token cross-entropy
         + aux_loss_coef * load-balancing loss   (Switch / OLMoE: E * sum_e f_e * P_e per layer,
                                                   f_e = fraction of top-k slots routed to e,
                                                   P_e = mean router probability; averaged over
                                                   layers; = k when perfectly balanced)
         + z_loss_coef   * router z-loss         (mean logsumexp(router logits)^2)

computed from the model's router aux (`aux["logits"]`, `aux["idx"]`) with zero deltas.

Written to DIR (atomically, via `rewire_jax.io.export.save_hf`): config.json, model.safetensors,
the tokenizer files, MODEL_CARD.md, metrics.jsonl (the loss curve) and loss_curve.png (only if
matplotlib is installed). While it runs, the tokenizer and the growing metrics.jsonl live in a
temporary directory (or in `--work-dir`, which is kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rewire_jax.demo import corpus, data
from rewire_jax.demo.card import cpu_reference_note, device_description, loss_curve_png, model_card
from rewire_jax.demo import tokenizer as demo_tokenizer
from rewire_jax.io.export import save_hf
from rewire_jax.model import ModelConfig, RopeConfig, cross_entropy, forward, init_params, zero_deltas

#: Greedy samples for the model card. A prompt ending in "\n" stops at a token boundary the
#: tokenizer never produces inside code (it merges "\n" with the next line's indentation), so the
#: second prompt shows the more natural continuation of the same line.
PROMPTS = ("def fibonacci(n):\n", "def fibonacci(n):", "import os\n\ndef read_config(path):")



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out: str
    # model
    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_width: int = 64
    rope_theta: float = 10000.0
    # optimisation
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    seed: int = 0
    # evaluation / logging
    eval_every: int = 200
    eval_windows: int = 32        # held-out and prose windows per periodic evaluation
    final_eval_windows: int = 256  # ... for the final evaluation (model card numbers)
    log_every: int = 10
    sample_tokens: int = 96       # new tokens per greedy sample (PROMPTS) in the card
    max_files: int = 0            # 0: the whole corpus; n: an evenly spaced subset (tests)
    work_dir: str = ""            # "": a temporary directory, removed at the end

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("need steps >= 1, batch_size >= 1 and seq_len >= 2")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} "
                             "heads of an even size (rotary embeddings)")

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            model_type="olmoe", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads, num_experts=self.num_experts,
            num_experts_per_tok=self.top_k, moe_intermediate_size=self.expert_width,
            moe_layers=tuple(range(self.num_layers)), norm_topk_prob=False, rms_norm_eps=1e-5,
            rope=RopeConfig(theta=self.rope_theta), qk_norm="flat",
            max_position_embeddings=max(1024, self.seq_len),
            eos_token_ids=(demo_tokenizer.EOS_ID,), pad_token_id=demo_tokenizer.PAD_ID,
            bos_token_id=None)


# -- losses -------------------------------------------------------------------------------------

def router_losses(router_logits, idx, num_experts: int):
    """router_logits [B, L, T, E] fp32; idx [B, L, T, k] -> (load-balancing loss, z-loss) scalars."""
    probs = jax.nn.softmax(router_logits, axis=-1)
    # f[l, e]: fraction of (token, slot) pairs per token routed to e (sums to k over e).
    f = jnp.mean(jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=-2), axis=(0, 2))
    p = jnp.mean(probs, axis=(0, 2))  # [L, E]
    lb = num_experts * jnp.mean(jnp.sum(f * p, axis=-1))
    z = jnp.mean(jax.nn.logsumexp(router_logits, axis=-1) ** 2)
    return lb, z


def loss_fn(params, batch, cfg: ModelConfig, aux_coef: float, z_coef: float):
    tokens, targets = batch[:, :-1], batch[:, 1:]
    logits, aux = forward(params, tokens, zero_deltas(cfg, tokens.shape[0]), cfg)
    ce = jnp.mean(cross_entropy(logits, targets))
    lb, z = router_losses(aux["logits"], aux["idx"], cfg.num_experts)
    return ce + aux_coef * lb + z_coef * z, {"ce": ce, "lb": lb, "z": z}


def make_optimizer(tc: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                      optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8,
                                  weight_decay=tc.weight_decay, mask=decay_mask))
    return opt, schedule


def _global_norm(tree):
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.6
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def make_train_step(cfg: ModelConfig, tc: TrainConfig, opt):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, cfg, tc.aux_loss_coef, tc.z_loss_coef)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads), **parts}
    return train_step


def make_eval_step(cfg: ModelConfig):
    @jax.jit
    def eval_step(params, batch, row_weight):
        """batch [B, T+1], row_weight [B] (0 for padding rows) -> (weighted sum of token CE,
        weighted expert counts [L, E] over the batch's tokens)."""
        tokens, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = forward(params, tokens, zero_deltas(cfg, tokens.shape[0]), cfg)
        ce = jnp.sum(cross_entropy(logits, targets) * row_weight[:, None])
        onehot = jax.nn.one_hot(aux["idx"], cfg.num_experts, dtype=jnp.float32)  # [B, L, T, k, E]
        counts = jnp.einsum("bltke,b->le", onehot, row_weight)
        return ce, counts
    return eval_step


# -- evaluation -----------------------------------------------------------------------------------

def eval_windows(stream: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """n non-overlapping windows of seq_len + 1 tokens, evenly spaced over the stream -> [n', T+1]."""
    w = seq_len + 1
    avail = stream.shape[0] // w
    if avail < 1:
        raise ValueError(f"evaluation stream of {stream.shape[0]} tokens is shorter than {w}")
    picks = np.unique(np.linspace(0, avail - 1, num=min(n, avail)).round().astype(np.int64))
    return np.stack([stream[i * w:(i + 1) * w] for i in picks]).astype(np.int32)


def evaluate(eval_step, params, windows: np.ndarray, batch_size: int, num_layers: int, num_experts: int):
    """Mean token CE over the windows and the expert counts [L, E]. Batches have a fixed shape (one
    compilation): the last one is padded with zero-weight copies of the first window."""
    total = 0.0
    counts = np.zeros((num_layers, num_experts))
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        real = len(chunk)
        weight = np.zeros(batch_size, np.float32)
        weight[:real] = 1.0
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(windows[:1], batch_size - real, 0)])
        s, c = eval_step(params, chunk, weight)
        total += float(s)
        counts += np.asarray(c, np.float64)
    return total / (len(windows) * (windows.shape[1] - 1)), counts


def balance_stats(counts: np.ndarray) -> dict:
    """Expert load per layer (counts [L, E]) -> max/mean, min/mean and normalised entropy."""
    load = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    E = counts.shape[1]
    ent = -np.sum(np.where(load > 0, load * np.log(np.maximum(load, 1e-30)), 0.0), axis=1) / math.log(E)
    return {"max_over_mean": (load.max(axis=1) * E).round(3).tolist(),
            "min_over_mean": (load.min(axis=1) * E).round(3).tolist(),
            "norm_entropy": ent.round(4).tolist()}


def unigram_ce(train_stream: np.ndarray, windows: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of the windows' targets under the add-one-smoothed unigram
    distribution of the training stream: the baseline a model must beat."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:]].mean())


# -- the run --------------------------------------------------------------------------------------

def _subset(files, n):
    if not n or n >= len(files):
        return list(files)
    return [files[i] for i in np.unique(np.linspace(0, len(files) - 1, n).round().astype(int))]


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def active_param_count(cfg: ModelConfig, params) -> int:
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return param_count(params) - cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert


def greedy_samples(cfg, params, tok_dir: Path, prompts: Sequence[str], n: int) -> list[dict]:
    """Greedy continuations (n new tokens, no early stop, no rewiring) via rewire_jax.generate."""
    from rewire_jax.api import Model, load_tokenizer
    from rewire_jax.generation import generate

    model = Model(cfg, params, load_tokenizer(tok_dir))
    res = generate(model, list(prompts), max_new_tokens=n, eos_token_id=None)
    return [{"prompt": p, "continuation": model.decode(t)} for p, t in zip(prompts, res.tokens)]


def train(tc: TrainConfig, log=print) -> dict:
    """Run the whole recipe; writes the HF directory tc.out and returns the run summary."""
    if tc.work_dir:
        work = Path(tc.work_dir).absolute()
        work.mkdir(parents=True, exist_ok=True)
        return _train(tc, work, log)
    with tempfile.TemporaryDirectory(prefix="rewire-demo-train-") as tmp:
        return _train(tc, Path(tmp), log)


def _train(tc: TrainConfig, work: Path, log) -> dict:
    t_start = time.time()
    out = Path(tc.out).absolute()
    cfg = tc.model_config()

    # data: tokenizer trained on the training split only; deterministic batches.
    train_files = _subset(corpus.train_files(), tc.max_files)
    heldout_files = _subset(corpus.heldout_files(), tc.max_files)
    tok_dir = work / "tokenizer"
    tok = demo_tokenizer.train_tokenizer(tc.vocab_size, out_dir=tok_dir, files=train_files)
    if len(tok) != tc.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, expected vocab_size={tc.vocab_size}")
    train_stream = data.encode_files(tok, train_files)
    heldout_stream = data.encode_files(tok, heldout_files)
    prose_stream = data.encode_texts(tok, [corpus.prose_text()])[0]
    held_small = eval_windows(heldout_stream, tc.seq_len, tc.eval_windows)
    prose_small = eval_windows(prose_stream, tc.seq_len, tc.eval_windows)
    held_final = eval_windows(heldout_stream, tc.seq_len, tc.final_eval_windows)
    prose_final = eval_windows(prose_stream, tc.seq_len, tc.final_eval_windows)
    baseline = {"heldout": unigram_ce(train_stream, held_final, tc.vocab_size),
                "prose": unigram_ce(train_stream, prose_final, tc.vocab_size)}
    t_data = time.time() - t_start
    log(f"data: {len(train_files)} train files ({train_stream.size:,} tokens), {len(heldout_files)} "
        f"held-out files ({heldout_stream.size:,}), prose {prose_stream.size:,} tokens; unigram "
        f"baseline held-out {baseline['heldout']:.3f} prose {baseline['prose']:.3f} ({t_data:.1f}s)")

    # Jitted: eager Flax init dispatches every op separately (seconds, even for a tiny model).
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(tc.seed))
    opt, schedule = make_optimizer(tc)
    opt_state = opt.init(params)
    train_step, eval_step = make_train_step(cfg, tc, opt), make_eval_step(cfg)
    n_params = param_count(params)
    log(f"model: {n_params:,} params ({active_param_count(cfg, params):,} active per token) on "
        f"{device_description()}")

    metrics_path = work / "metrics.jsonl"
    metrics_f = metrics_path.open("w")
    log(f"metrics: {metrics_path}")

    def record(row):
        metrics_f.write(json.dumps(row) + "\n")
        metrics_f.flush()

    def run_eval(step, held, prose):
        h, counts = evaluate(eval_step, params, held, tc.batch_size, cfg.num_layers, cfg.num_experts)
        p, _ = evaluate(eval_step, params, prose, tc.batch_size, cfg.num_layers, cfg.num_experts)
        bal = balance_stats(counts)
        record({"kind": "eval", "step": step, "heldout_loss": h, "prose_loss": p,
                "tokens": step * tc.batch_size * tc.seq_len, "windows": len(held), **bal})
        log(f"eval step {step}: held-out {h:.4f} prose {p:.4f} | expert max/mean "
            f"{bal['max_over_mean']} entropy {bal['norm_entropy']}")
        return h, p, bal

    batches = data.batches(train_stream, tc.batch_size, tc.seq_len, tc.seed)
    t_train = time.time()
    t_first_step = None
    pending: list[dict] = []  # device scalars of the steps since the last log line (no sync)
    last_ce: list = []  # per-step train CE of the last 50 steps, for the final train loss
    for step in range(1, tc.steps + 1):
        params, opt_state, m = train_step(params, opt_state, jnp.asarray(next(batches)))
        pending.append(m)
        last_ce = (last_ce + [m["ce"]])[-50:]
        if step == 1:
            jax.block_until_ready(m["loss"])
            t_first_step = time.time() - t_train  # includes compilation
            t_after_first = time.time()
        if step % tc.log_every == 0 or step == tc.steps or step == 1:
            # Logged values are means over the steps since the previous line (smoother curve).
            m = {k: float(np.mean([float(x[k]) for x in pending])) for k in pending[0]}
            pending = []
            elapsed = time.time() - t_train
            record({"kind": "train", "step": step, "lr": float(schedule(step - 1)),
                    "tokens": step * tc.batch_size * tc.seq_len, "elapsed_s": round(elapsed, 2), **m})
            rate = (step - 1) / max(time.time() - t_after_first, 1e-9) if step > 1 else 0.0
            log(f"step {step}/{tc.steps}: loss {m['loss']:.4f} ce {m['ce']:.4f} lb {m['lb']:.3f} "
                f"z {m['z']:.2f} |g| {m['grad_norm']:.2f} ({rate:.2f} steps/s)")
        if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
            run_eval(step, held_small, prose_small)
    jax.block_until_ready(params)
    t_loop = time.time() - t_train
    steady = (tc.steps - 1) / max(time.time() - t_after_first, 1e-9) if tc.steps > 1 else float("nan")

    final_train = float(np.mean([float(x) for x in last_ce]))
    held_loss, prose_loss, bal = run_eval(tc.steps, held_final, prose_final)
    metrics_f.close()
    samples = greedy_samples(cfg, params, tok_dir, PROMPTS, tc.sample_tokens) if tc.sample_tokens else []
    wall = time.time() - t_start

    summary = {
        "model_config": {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("out", "work_dir")},
        "params": n_params, "active_params": active_param_count(cfg, params),
        "tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "train_loss": final_train, "heldout_loss": held_loss, "prose_loss": prose_loss,
        "unigram_baseline": baseline, "balance_heldout": bal,
        "heldout_eval_tokens": int(held_final.shape[0] * tc.seq_len),
        "prose_eval_tokens": int(prose_final.shape[0] * tc.seq_len),
        "wall_time_s": round(wall, 1), "train_loop_s": round(t_loop, 1),
        "first_step_s": round(t_first_step, 2), "steps_per_s": round(steady, 4),
        "data_prep_s": round(t_data, 1), "device": device_description(),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "corpus_fingerprint": corpus.corpus_fingerprint(), "train_files": len(train_files),
        "heldout_files": len(heldout_files), "train_stream_tokens": int(train_stream.size),
        "samples": samples, "cpu_note": cpu_reference_note(tc),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m rewire_jax.demo.train " + " ".join(_cli_args(tc)),
    }
    extra = {"MODEL_CARD.md": model_card(cfg, tc, summary),
             "metrics.jsonl": metrics_path.read_text(),
             "train_summary.json": json.dumps(summary, indent=2) + "\n"}
    png = loss_curve_png(metrics_path)
    if png is not None:
        extra["loss_curve.png"] = png
    save_hf(cfg, params, out, tokenizer=tok_dir, extra_files=extra)
    log(f"wrote {out} ({wall:.0f}s): train {final_train:.4f} held-out {held_loss:.4f} prose "
        f"{prose_loss:.4f}")
    for sample in samples:
        log(f"--- greedy sample ---\n{sample['prompt']}{sample['continuation']}")
    return summary


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HELP = {
    "expert_width": "SwiGLU width of each routed expert (HF intermediate_size)",
    "top_k": "experts per token", "steps": "optimizer steps",
    "lr": "peak AdamW learning rate", "min_lr_ratio": "final lr / peak lr (cosine decay)",
    "aux_loss_coef": "load-balancing loss weight", "z_loss_coef": "router z-loss weight",
    "eval_every": "steps between periodic evaluations (0: only the final one)",
    "eval_windows": "held-out and prose windows per periodic evaluation",
    "final_eval_windows": "held-out and prose windows for the final evaluation",
    "sample_tokens": "new tokens per greedy sample in the model card (0: none)",
    "max_files": "use an evenly spaced subset of this many files per split (0: all)",
    "work_dir": "keep the tokenizer and metrics.jsonl here (default: a temporary directory)",
}


def _cli_args(tc: TrainConfig) -> list[str]:
    """The flags that reproduce tc (those that differ from the defaults, plus --out)."""
    args = ["--out", Path(tc.out).name]
    for name, f in _FIELDS.items():
        if name not in ("out", "work_dir") and getattr(tc, name) != f.default:
            args += ["--" + name.replace("_", "-"), str(getattr(tc, name))]
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m rewire_jax.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output HF model directory")
    for name, f in _FIELDS.items():
        if name == "out":
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{_HELP.get(name, '')} (default {f.default!r})".strip())
    ns = p.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        p.error(str(e))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    tc = parse_args(argv)
    return train(tc, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
