"""The demo model's card: the markdown MODEL_CARD.md, the loss-curve PNG and the CPU timing note
(written by `rewire_jax.demo.train` next to the weights)."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Optional

import jax

from rewire_jax.model import ModelConfig

#: CPU timing of the default model/batch shape, measured with `--steps 40 --eval-every 20` on the
#: project's 2-core development machine (AMD EPYC, JAX 0.10.2 CPU, cores shared with other jobs):
#: steady steps/s (eval included) and the fixed cost outside the step loop (data preparation,
#: compilation, final evaluation and sample). The model card extrapolates from it.
CPU_REFERENCE = {"steps_per_s": 0.379, "fixed_s": 75.0,
                 "machine": "2-core AMD EPYC (shared), JAX 0.10.2 on CPU",
                 "shape": dict(vocab_size=4096, hidden_size=192, num_layers=4, num_heads=4,
                               num_experts=16, top_k=2, expert_width=64, batch_size=16, seq_len=256)}


def cpu_reference_note(tc) -> str:
    """'The same command on a 2-core CPU takes ~X min' for the measured shape, else ''."""
    ref = CPU_REFERENCE
    if any(getattr(tc, k) != v for k, v in ref["shape"].items()):
        return ""
    minutes = (tc.steps / ref["steps_per_s"] + ref["fixed_s"]) / 60
    return (f"The same command on a {ref['machine']} takes ~{minutes:.0f} min: it ran at "
            f"{ref['steps_per_s']:.2f} steps/s ({1 / ref['steps_per_s']:.1f} s/step) in a measured "
            f"40-step run of this shape, plus ~{ref['fixed_s'] / 60:.0f} min of data preparation, "
            f"compilation and evaluation.")


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or ""
    if d.platform == "cpu":
        import os
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    return f"{d.platform.upper()} ({kind})"


def loss_curve_png(metrics_path: Path) -> Optional[bytes]:
    """Train / held-out / prose loss curve as PNG bytes, or None when matplotlib is missing."""
    try:
        import io

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    tr = [(r["step"], r["ce"]) for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*tr), label="train CE")
    if ev:
        ax.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", label="held-out stdlib")
        ax.plot([r["step"] for r in ev], [r["prose_loss"] for r in ev], "s-", label="prose (pydoc topics)")
    ax.set_xlabel("step"), ax.set_ylabel("nats / token"), ax.set_ylim(bottom=0), ax.legend(), ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def model_card(cfg: ModelConfig, tc, s: dict) -> str:
    bal = s["balance_heldout"]
    rows = "\n".join(f"| {i} | {bal['max_over_mean'][i]:.2f} | {bal['min_over_mean'][i]:.2f} | "
                     f"{bal['norm_entropy'][i]:.3f} |" for i in range(cfg.num_layers))
    samples = "\n".join(f"Prompt `{x['prompt']!r}`:\n\n```python\n{x['prompt']}{x['continuation']}\n```\n"
                        for x in s["samples"]) or "(none)"
    cpu_note = s.get("cpu_note") or "No CPU timing was measured for this model shape."
    return f"""# rewire-jax demo MoE (OLMoE architecture, trained on the Python stdlib)

A deliberately small Mixture-of-Experts language model that rewire-jax trains itself, so that the
examples and tests have a real (non-random) MoE with meaningful routing without downloading
anything. It is an HF-format `olmoe` checkpoint: `transformers.OlmoeForCausalLM.from_pretrained`
and `rewire_jax.load` both read this directory.

## Architecture

| | |
|---|---|
| layers | {cfg.num_layers} (every layer MoE) |
| hidden size | {cfg.hidden_size} |
| attention heads | {cfg.num_heads} (head dim {cfg.head_dim}, flat q/k RMSNorm, RoPE theta {cfg.rope.theta:g}) |
| experts | {cfg.num_experts} routed, top-{cfg.num_experts_per_tok}, softmax router, no renormalisation |
| expert width | {cfg.moe_intermediate_size} (SwiGLU) |
| vocabulary | {cfg.vocab_size} (byte-level BPE, `<|endoftext|>`=0, `<|pad|>`=1) |
| parameters | {s['params']:,} total, {s['active_params']:,} active per token |
| weights | float32 safetensors |

## Data

- Training text: the `.py` files of the CPython {s['python']} standard library that trained it
  ({s['train_files']} files after the exclusions in `rewire_jax/demo/corpus.py`: tests,
  site-packages, build-specific files, files > 1 MB, held-out split), {s['train_stream_tokens']:,}
  tokens, documents separated by `<|endoftext|>`.
- Corpus fingerprint (sha256 of relative path + size of each training file):
  `{s['corpus_fingerprint']}`.
- Held-out code: the ~5% of stdlib files with `sha256(rel_path) % 20 == 0` ({s['heldout_files']} files),
  never seen by the tokenizer or the model.
- Prose: `pydoc_data/topics.py` (the language reference as English text), in neither split:
  a shifted-domain evaluation set.

## Training

`{s['command']}`

- {tc.steps} steps x batch {tc.batch_size} x {tc.seq_len} tokens = {s['tokens_seen']:,} tokens
  seen (random windows of the packed training stream, numpy seed {tc.seed}).
- AdamW (b1 0.9, b2 0.95, weight decay {tc.weight_decay} on matrices), peak lr {tc.lr:g} with
  {tc.warmup_steps} warmup steps and cosine decay to {tc.lr * tc.min_lr_ratio:g}; gradient
  clipping at global norm {tc.grad_clip:g}; float32.
- Loss: next-token cross-entropy + {tc.aux_loss_coef:g} x load-balancing loss (Switch/OLMoE form
  `E * sum_e f_e P_e` per layer, averaged over layers; balanced = {cfg.num_experts_per_tok})
  + {tc.z_loss_coef:g} x router z-loss.
- Trained on: {s['device']}, JAX {s['jax_version']}; wall time {s['wall_time_s'] / 60:.1f} min
  (training loop {s['train_loop_s'] / 60:.1f} min, {s['steps_per_s']:.2f} steps/s after compilation).
- {cpu_note}

## Results (nats per token)

| | this model | unigram baseline |
|---|---|---|
| train (mean CE of the last 50 steps) | {s['train_loss']:.3f} | |
| held-out stdlib code ({s['heldout_eval_tokens']:,} tokens) | {s['heldout_loss']:.3f} | {s['unigram_baseline']['heldout']:.3f} |
| prose, pydoc topics ({s['prose_eval_tokens']:,} tokens) | {s['prose_loss']:.3f} | {s['unigram_baseline']['prose']:.3f} |

The unigram baseline is the add-one-smoothed token frequency of the training stream.

### Expert balance on the held-out code tokens

Load = share of the top-{cfg.num_experts_per_tok} routing slots each expert receives; 1.0 is perfectly even.

| layer | max / mean load | min / mean load | normalised entropy |
|---|---|---|---|
{rows}

## Samples (greedy, {tc.sample_tokens} new tokens, no rewiring)

{samples}

## Limitations

A toy: {s['params'] / 1e6:.1f}M parameters trained for minutes on one small corpus. It writes
Python-looking code with plausible structure but is not a useful code model. It is meant for
demonstrating and testing test-time rerouting, not for any downstream use. A prompt that ends in
a newline splits a token the tokenizer would merge with the next line's indentation, so such
prompts often continue with a new top-level statement. The default learning rate of
`rewire_jax.demo.train` was picked by comparing the held-out loss of a few runs of this shape,
so the held-out number is slightly optimistic.
"""


# -- CLI ----------------------------------------------------------------------------------------
