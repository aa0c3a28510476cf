"""The generation backend: requests -> completions. One function, swappable (a refilling batch
queue can replace `generate_backend` without touching the runner).

    backend = generate_backend(model)
    outs = backend(requests, rewire=RewireOptions() | None, sampling=Sampling(...), seed=123)

Each Request is one row (a prompt as token ids, its own token budget and stop strings). All rows
go to ONE `rewire_jax.generate` call (lock-step batch, each row its own deltas) whose
max_new_tokens is the largest budget; each row is then cut at its own budget and at its first stop
string (tokens generated past it are discarded from the completion, but counted in the cost).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

from rewire_jax import RewireOptions, Sampling, generate
from rewire_jax.bench import perf

from .extract import truncate_at_stop


@dataclasses.dataclass(frozen=True)
class Request:
    ids: tuple                # prompt token ids
    max_new_tokens: int
    stops: tuple = ()


@dataclasses.dataclass
class Completion:
    text: str                 # after the stop-string / budget cut
    stopped: bool             # a stop string was found
    new_tokens: int           # tokens the row generated (EOS included)
    phases: list              # [{"context_len", "loss_before", "loss_after"}] per optimisation phase
    seconds: float            # the batch's wall time / rows
    flops: float              # estimated FLOPs for this row (see `estimate_flops`)


Backend = Callable[..., list]


def encode_prompt(model, text: str, chat: bool) -> list[int]:
    """Token ids as the family expects: chat -> the tokenizer's chat template (a user turn plus the
    generation prompt; the template adds BOS if the family uses one); plain -> the tokenizer's
    default special tokens (BOS for Llama/DeepSeek-style tokenizers, nothing for OLMoE/Qwen)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"model at {model.path} has no tokenizer: the harness needs text prompts")
    if chat:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    return list(tok(text, add_special_tokens=True)["input_ids"])


def has_chat_template(model) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None))


def forward_flops(cfg, T: int) -> float:
    """Forward FLOPs over T tokens (causal): all decoder layers + LM head (`rewire_jax.perf`)."""
    return cfg.num_layers * perf.layer_flops(cfg, T)[0] + perf.head_flops(cfg, T)


def estimate_flops(cfg, prompt_len: int, new_tokens: int, contexts: Sequence[int], steps: int) -> float:
    """One row's FLOPs: prefill + decode = forward(P + N) (a KV-cache decode computes each token
    once); each optimisation phase at context T adds `steps` x (forward + activation backward from
    the top down to layer 1 + LM head) = perf.phase_flops(T, steps, lowest=0), plus the re-prefill
    of the context with the new deltas, forward(T) (the first phase's prefill replaces the prompt's)."""
    total = forward_flops(cfg, prompt_len + new_tokens)
    for i, T in enumerate(contexts):
        total += perf.phase_flops(cfg, int(T), steps, lowest=0) + (forward_flops(cfg, int(T)) if i else 0.0)
    return float(total)


def _completion_text(tok, prompt_ids, new_ids) -> str:
    """Decode the new tokens in context (keeps a leading space that SentencePiece would drop)."""
    full = tok.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    head = tok.decode(list(prompt_ids), skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tok.decode(list(new_ids), skip_special_tokens=True)


def generate_backend(model) -> Backend:
    """The backend over `rewire_jax.generate` (one lock-step batch per call)."""

    def run(requests: Sequence[Request], rewire: Optional[RewireOptions], sampling: Sampling,
            seed: int) -> list[Completion]:
        t0 = time.perf_counter()
        res = generate(model, [list(r.ids) for r in requests], max(r.max_new_tokens for r in requests),
                       rewire=rewire, sampling=sampling, seed=seed)
        secs = (time.perf_counter() - t0) / len(requests)
        out = []
        for b, r in enumerate(requests):
            new = res.tokens[b][:r.max_new_tokens]
            text, stopped = truncate_at_stop(_completion_text(model.tokenizer, r.ids, new), r.stops)
            phases = [{"context_len": int(p.context_len[b]), "loss_before": float(p.loss_before[b]),
                       "loss_after": float(p.loss_after[b])} for p in res.phases if p.context_len[b] > 0]
            flops = estimate_flops(model.config, len(r.ids), len(res.tokens[b]), [p["context_len"] for p in phases],
                                   rewire.steps if rewire else 0)
            out.append(Completion(text, stopped, len(res.tokens[b]), phases, secs, flops))
        return out

    return run
