"""Analyses of routing (paper Sec. 5, App. B.2, C.1): pathways, edit distances, utilisation,
router entropy and layer confidence. Everything starts from one `trace` (a forward pass that keeps
the router outputs); the rest are small numpy functions on its arrays.

Shapes: L = MoE layers, T = tokens, k = experts per token, E = routed experts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from rapidfuzz.distance import Levenshtein

from .api import Model, check_token_ids
from .model import batched_deltas, forward


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
