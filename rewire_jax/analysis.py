"""Analyses of routing (paper Sec. 5, App. B.2, C.1): pathways, edit distances, utilisation,
router entropy and layer confidence. Everything starts from one `trace` (a forward pass that keeps
the router outputs); the rest are small numpy functions on its arrays.

Shapes: L = MoE layers, T = tokens, k = experts per token, E = routed experts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from rapidfuzz.distance import Levenshtein

from .api import Model, check_token_ids
from .model import batched_deltas, forward
from .rewire import bucket_length


@dataclasses.dataclass
class RoutingTrace:
    """Router outputs of one sequence under some deltas (numpy arrays)."""

    idx: np.ndarray         # [L, T, k] chosen experts (model order: descending weight)
    probs: np.ndarray       # [L, T, E] softmax over all routed experts of the (delta-shifted) logits
    confidence: np.ndarray  # [L, T] token confidence C_l^n = -(1/k) sum_topk log p (Eq. 2)

    @property
    def entropy(self) -> np.ndarray:
        """[L, T] entropy (nats) of the router distribution."""
        p = np.clip(self.probs, 1e-30, 1.0)
        return -np.sum(p * np.log(p), axis=-1)

    @property
    def layer_confidence(self) -> np.ndarray:
        """[L] layer score C_l (Eq. 3): mean token confidence."""
        return self.confidence.mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _trace(params, tokens, deltas, cfg):
    _, aux = forward(params, tokens, deltas, cfg)
    return aux["idx"][0], jax.nn.softmax(aux["logits"][0], axis=-1), aux["score"][0]


def trace(model: Model, tokens, deltas=None) -> RoutingTrace:
    """Route one sequence `tokens [T]` under `deltas [L, E]` (default zeros)."""
    tokens = check_token_ids(tokens, model.config.vocab_size)
    if tokens.shape[0] != 1:
        raise ValueError(f"trace takes one sequence, got a batch of {tokens.shape[0]}")
    idx, probs, conf = _trace(model.params, tokens, batched_deltas(deltas, 1, model.config), model.config)
    return RoutingTrace(np.asarray(idx), np.asarray(probs), np.asarray(conf))


def pathways(idx: np.ndarray) -> list[str]:
    """App. B.2: token n's pathway is its experts per layer ('3,1,5'), layers joined by '-'.

    idx [L, T, k] -> T strings.
    """
    L, T, _ = idx.shape
    return ["-".join(",".join(str(int(e)) for e in idx[l, t]) for l in range(L)) for t in range(T)]


def pathway_edit_distance(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """[T] Levenshtein distance between the two pathway strings of every token (App. B.2)."""
    return np.array([Levenshtein.distance(a, b) for a, b in zip(pathways(idx_a), pathways(idx_b))])


def layer_edit_distance(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """[L] mean over tokens of the edit distance between the layer's expert lists ('3,1,5')."""
    L, T, _ = idx_a.shape
    seg = lambda idx, l, t: ",".join(str(int(e)) for e in idx[l, t])
    return np.array([np.mean([Levenshtein.distance(seg(idx_a, l, t), seg(idx_b, l, t)) for t in range(T)])
                     for l in range(L)])


def utilisation(idx: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] fraction of routing slots that went to each expert (rows sum to 1)."""
    L = idx.shape[0]
    counts = np.stack([np.bincount(idx[l].ravel(), minlength=num_experts) for l in range(L)])
    return counts / counts.sum(axis=-1, keepdims=True)


def utilisation_shift(idx_a: np.ndarray, idx_b: np.ndarray, num_experts: int) -> np.ndarray:
    """[L] total-variation distance between the per-layer expert utilisation of a and b (0..1)."""
    return 0.5 * np.abs(utilisation(idx_a, num_experts) - utilisation(idx_b, num_experts)).sum(axis=-1)


def load_balance(idx: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """Per layer: max load / mean load (1 = perfectly balanced) and normalised entropy of the load."""
    u = utilisation(idx, num_experts)
    ent = -np.sum(np.where(u > 0, u * np.log(np.clip(u, 1e-30, 1)), 0.0), axis=-1) / np.log(num_experts)
    return {"max_over_mean": u.max(axis=-1) * num_experts, "normalised_entropy": ent}


# -- what one rewired generation did (the CLI's summary table) ---------------------------------------

@dataclasses.dataclass
class RewireSummary:
    """What rewiring did in one generation. Layers are MoE layers (model layer index in `layer`)."""

    phases: list[dict]       # per phase: context_len, loss_before, loss_after
    layers: list[dict]       # per MoE layer: layer, delta_norm, up / down [[expert, delta], ...]
    generated_tokens: int    # tokens of the continuation the routing and NLL rows are about
    routing_changed: float   # fraction of them routed to another expert set in >= 1 MoE layer
    routing_changed_per_layer: list[float]   # [L] the same fraction, per MoE layer
    nll_baseline: float      # mean NLL per generated token under zero deltas (the baseline model)
    nll_rewired: float       # ... under the final deltas

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A compact plain-text table (the CLI prints it after the continuations)."""
        lines = ["phase  context  loss before  loss after"]
        lines += [f"{i:>5}  {p['context_len']:>7}  {p['loss_before']:>11.4f}  {p['loss_after']:>10.4f}"
                  for i, p in enumerate(self.phases)]
        pair = lambda ed: "  ".join(f"{e:>3}:{d:+.3f}" for e, d in ed)
        lines += ["", "layer  |delta|  pushed up most (expert:delta)   pushed down most       routing changed"]
        lines += [f"{r['layer']:>5}  {r['delta_norm']:>7.3f}  {pair(r['up']):<31}  {pair(r['down']):<21}  "
                  f"{c:>15.1%}" for r, c in zip(self.layers, self.routing_changed_per_layer)]
        lines += ["", f"rewired continuation, {self.generated_tokens} tokens (routed with the final deltas):",
                  f"  routed to other experts than the baseline model in >= 1 MoE layer: {self.routing_changed:.1%}",
                  f"  NLL per token: {self.nll_baseline:.4f} under the baseline (zero deltas), "
                  f"{self.nll_rewired:.4f} under the rewired deltas"]
        return "\n".join(lines)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _route_and_nll(params, tokens, deltas, cfg):
    """tokens [1, T], deltas [D, L, E] -> (idx [D, L, T, k] chosen experts, nll [D, T-1] of token t+1)."""
    D = deltas.shape[0]
    toks = jnp.broadcast_to(tokens, (D, tokens.shape[1]))
    logits, aux = forward(params, toks, deltas, cfg)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return aux["idx"], -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)[..., 0]


def prepare_summary(model: Model, length: int) -> None:
    """Compile `summarize`'s forward for a prompt + continuation of `length` tokens, ahead of the
    call (the CLI does it on a second thread while the rewired run goes on); nothing is run."""
    tokens = jax.ShapeDtypeStruct((1, bucket_length(length)), jnp.int32)
    deltas = jax.ShapeDtypeStruct((2,) + tuple(model.config.delta_shape), jnp.float32)
    _route_and_nll.lower(model.params, tokens, deltas, model.config).compile()


def routing_changed(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """[L, T] True where the two routings chose a different set of experts (order ignored)."""
    return np.any(np.sort(idx_a, axis=-1) != np.sort(idx_b, axis=-1), axis=-1)


def summarize(model: Model, prompt, new_tokens, deltas, phases: list[dict], top: int = 2) -> RewireSummary:
    """Summary of one rewired generation: `prompt` and `new_tokens` (ids), its final `deltas`
    [L, E] and its `phases` (GenerationResult.phase_dicts()). The routing and NLL rows are over the
    generated tokens, teacher-forced on prompt + continuation with zero and with the final deltas
    (one forward each; the sequence is padded to a length bucket so that prompts share programs,
    and the padding, after the last token, changes nothing before it under causal attention)."""
    cfg = model.config
    prompt, new_tokens = [int(t) for t in prompt], [int(t) for t in new_tokens]
    seq = check_token_ids(prompt + new_tokens, cfg.vocab_size)
    deltas = np.asarray(deltas, np.float32).reshape(cfg.delta_shape)
    P, T = len(prompt), seq.shape[1]
    padded = jnp.zeros((1, bucket_length(T)), jnp.int32).at[:, :T].set(seq)
    idx, nll = _route_and_nll(model.params, padded, jnp.stack([jnp.zeros_like(deltas), deltas]), cfg)
    idx, nll = np.asarray(idx)[:, :, P:T], np.asarray(nll)[:, P - 1:T - 1]   # the generated tokens
    changed = routing_changed(idx[0], idx[1])                             # [L, N]
    order = np.argsort(-deltas, axis=-1, kind="stable")
    layers = [{"layer": int(layer), "delta_norm": float(np.linalg.norm(deltas[l])),
               "up": [[int(e), float(deltas[l, e])] for e in order[l, :top]],
               "down": [[int(e), float(deltas[l, e])] for e in order[l, ::-1][:top]]}
              for l, layer in enumerate(cfg.moe_layers)]
    n = len(new_tokens)
    return RewireSummary(
        phases=[{k: p[k] for k in ("context_len", "loss_before", "loss_after")} for p in phases],
        layers=layers, generated_tokens=n,
        routing_changed=float(changed.any(axis=0).mean()) if n else 0.0,
        routing_changed_per_layer=[float(c) for c in changed.mean(axis=1)] if n else [0.0] * len(layers),
        nll_baseline=float(nll[0].mean()) if n else float("nan"),
        nll_rewired=float(nll[1].mean()) if n else float("nan"))
