"""The generation backend: requests -> completions. One function, swappable.

    backend = generate_backend(model)
    outs = backend(requests, rewire=RewireOptions() | None, sampling=Sampling(...), seed=123)
    outs = backend(requests, rewire=None, sampling=..., seed=..., route=RouteOverride)   # C3PO, per request

Each Request is one row (a prompt as token ids, its own token budget and stop strings). The rows
go through `rewire_jax.generate_queue` (each row its own deltas, phase schedule and budget): a row
ends at EOS, at its own max_new_tokens, or at the token completing one of its stop strings, and
its place in the batch goes to the next request, so no row decodes past its end while the longest
one finishes. `batch_size` (default: all the requests of the call) is the number of rows decoded
together. The completion text is then cut at the first stop string (`truncate_at_stop`).
`generate_backend(model, lockstep=True)` is the previous backend: one lock-step `generate` batch
whose budget is the largest, each row cut at its own budget and first stop string afterwards.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

from rewire_jax import RewireOptions, Sampling, generate, generate_queue
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


def generate_backend(model, batch_size: Optional[int] = None, lockstep: bool = False) -> Backend:
    """The backend over `rewire_jax.generate_queue` (or one lock-step `generate` batch per call)."""

    def run(requests: Sequence[Request], rewire: Optional[RewireOptions], sampling: Sampling,
            seed: int, route=None) -> list[Completion]:
        """route: None, or a routing override with one row per request (model.moe.RouteOverride)."""
        t0 = time.perf_counter()
        prompts = [list(r.ids) for r in requests]
        if lockstep:
            res = generate(model, prompts, max(r.max_new_tokens for r in requests), rewire=rewire,
                           sampling=sampling, seed=seed, route=route)
            tokens = res.tokens
            phases_of = lambda b: [{"context_len": int(p.context_len[b]), "loss_before": float(p.loss_before[b]),
                                    "loss_after": float(p.loss_after[b])} for p in res.phases if p.context_len[b] > 0]
        else:
            res = generate_queue(model, prompts, [r.max_new_tokens for r in requests],
                                 batch_size=batch_size or len(requests), rewire=rewire, sampling=sampling,
                                 seed=seed, stops=[list(r.stops) for r in requests], route=route)
            tokens = res.tokens
            phases_of = lambda b: [{k: p[k] for k in ("context_len", "loss_before", "loss_after")}
                                   for p in res.phases[b]]
        secs = (time.perf_counter() - t0) / len(requests)
        out = []
        for b, r in enumerate(requests):
            new = tokens[b][:r.max_new_tokens]
            text, stopped = truncate_at_stop(_completion_text(model.tokenizer, r.ids, new), r.stops)
            phases = phases_of(b)
            flops = estimate_flops(model.config, len(r.ids), len(tokens[b]), [p["context_len"] for p in phases],
                                   rewire.steps if rewire else 0)
            out.append(Completion(text, stopped, len(tokens[b]), phases, secs, flops))
        return out

    return run
