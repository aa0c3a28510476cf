"""Routers: router logits z~ = x W (+ b) + delta -> (combine weights, chosen experts).

Every function takes z~ [N, E] fp32 *with the delta already added* (the delta sits before any
softmax, sigmoid, group scoring or top-k, so it moves the choice of experts, the choice of groups
and the weights alike) and returns (weights [N, k] fp32, idx [N, k] int32). The token confidence
used by the rewiring (`token_confidence`) is computed from the same z~ and idx for every
router, so the chosen set is always the one the model actually used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def token_confidence(logits_fp32, idx):
    """Eq. 2: C^n = -(1/k) sum_{j in chosen top-k} log softmax(z~)_j.  [N, E], [N, k] -> [N]"""
    logp = jax.nn.log_softmax(logits_fp32, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, idx, axis=-1), axis=-1)


def softmax_topk_route(logits_fp32, k: int, norm_topk_prob: bool):
    """OLMoE / Qwen / Mixtral router: softmax over all E, top-k, optional renormalisation.

    logits [N, E] fp32 (delta already added) -> (weights [N, k] fp32, idx [N, k] int32)
    """
    probs = jax.nn.softmax(logits_fp32, axis=-1)
    weights, idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, idx


def _group_mask(group_scores, topk_group: int, group_size: int):
    """group_scores [N, G] -> bool [N, G * group_size]: experts of the topk_group best groups."""
    _, gidx = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.any(jax.nn.one_hot(gidx, group_scores.shape[-1], dtype=bool), axis=1)   # [N, G]
    return jnp.repeat(keep, group_size, axis=-1)


def group_limited_route(logits, k: int, n_group: int, topk_group: int):
    """DeepSeek-V2 group_limited_greedy: p = softmax over all E; a group's score is its max p; the
    topk_group best groups survive (others' p set to 0); top-k of the masked p. The weights are the
    full-softmax p (no renormalisation)."""
    probs = jax.nn.softmax(logits, axis=-1)
    N, E = probs.shape
    group_scores = jnp.max(probs.reshape(N, n_group, E // n_group), axis=-1)
    masked = jnp.where(_group_mask(group_scores, topk_group, E // n_group), probs, 0.0)
    return jax.lax.top_k(masked, k)


def topk_softmax_route(logits, k: int):
    """gpt-oss: top-k of the logits themselves, then a softmax over the k chosen logits."""
    top, idx = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), idx


def sigmoid_group_route(logits, k: int, n_group: int, topk_group: int, correction_bias, norm: bool):
    """DeepSeek-V3 noaux_tc: s = sigmoid(z~); the choice uses s + correction_bias (group score = sum
    of its two best), the weights are s at the chosen experts (optionally renormalised)."""
    scores = jax.nn.sigmoid(logits)
    choice = scores + correction_bias.astype(jnp.float32)
    N, E = choice.shape
    group_scores = jnp.sum(jax.lax.top_k(choice.reshape(N, n_group, E // n_group), 2)[0], axis=-1)
    choice = jnp.where(_group_mask(group_scores, topk_group, E // n_group), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if norm:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights, idx


class Router(nnx.Module):
    """A routing rule: z~ [N, E] fp32 (delta already added) -> (weights [N, k] fp32 incl.
    routed_scaling_factor, idx [N, k] int32). No Params: the router's weight (and DeepSeek-V3's
    correction bias) belong to the MoE block, which computes z~ and passes the bias in.

    Subclass one (override `choose`, or `__call__` to transform z~ first) and put it on a layer's
    `mlp.routing` to route differently. `pathway` and `select` serve routing overrides (C3PO):
    select(pathway(z~)) is the router's own choice (see below)."""

    def __init__(self, k: int, scaling: float = 1.0):
        self.k, self.scaling = k, scaling

    @classmethod
    def from_config(cls, cfg) -> "Router":
        raise NotImplementedError

    def choose(self, logits, correction_bias=None):
        """z~ [N, E] fp32 -> (weights [N, k] fp32, idx [N, k]) before the scaling factor."""
        raise NotImplementedError

    def __call__(self, logits, correction_bias=None):
        weights, idx = self.choose(logits, correction_bias)
        return self._finish(weights, idx)

    def pathway(self, logits):
        """z~ [N, E] fp32 -> the per-expert scores [N, E] fp32 that the top-k chooses from."""
        return jax.nn.softmax(logits, axis=-1)

    def select(self, scores, correction_bias=None):
        """scores [N, E] (`pathway`, possibly re-mixed) -> (weights, idx) by this router's rule."""
        raise NotImplementedError

    def _finish(self, weights, idx):
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights, idx.astype(jnp.int32)


class SoftmaxTopK(Router):
    """OLMoE / Qwen / Mixtral: softmax over all E, top-k, optional renormalisation."""

    def __init__(self, k: int, norm_topk_prob: bool = False, scaling: float = 1.0):
        super().__init__(k, scaling)
        self.norm_topk_prob = norm_topk_prob

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router.routed_scaling_factor)

    def choose(self, logits, correction_bias=None):
        return softmax_topk_route(logits, self.k, self.norm_topk_prob)

    def select(self, scores, correction_bias=None):
        weights, idx = jax.lax.top_k(scores, self.k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return self._finish(weights, idx)


class GroupLimited(Router):
    """DeepSeek-V2 group_limited_greedy (ignores norm_topk_prob: HF has no such branch)."""

    def __init__(self, k: int, n_group: int, topk_group: int, scaling: float = 1.0):
        super().__init__(k, scaling)
        self.n_group, self.topk_group = n_group, topk_group

    @classmethod
    def from_config(cls, cfg):
        r = cfg.router
        return cls(cfg.num_experts_per_tok, r.n_group, r.topk_group, r.routed_scaling_factor)

    def choose(self, logits, correction_bias=None):
        return group_limited_route(logits, self.k, self.n_group, self.topk_group)

    def select(self, scores, correction_bias=None):
        N, E = scores.shape
        group_scores = jnp.max(scores.reshape(N, self.n_group, E // self.n_group), axis=-1)
        masked = jnp.where(_group_mask(group_scores, self.topk_group, E // self.n_group), scores, 0.0)
        return self._finish(*jax.lax.top_k(masked, self.k))


class TopKSoftmax(Router):
    """gpt-oss: top-k of the logits, softmax over the k chosen."""

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.num_experts_per_tok, cfg.router.routed_scaling_factor)

    def choose(self, logits, correction_bias=None):
        return topk_softmax_route(logits, self.k)

    def select(self, scores, correction_bias=None):
        weights, idx = jax.lax.top_k(scores, self.k)
        return self._finish(weights / jnp.sum(weights, axis=-1, keepdims=True), idx)


class SigmoidGroup(Router):
    """DeepSeek-V3 noaux_tc: sigmoid scores, the choice moved by the correction bias."""

    def __init__(self, k: int, n_group: int, topk_group: int, norm_topk_prob: bool = False, scaling: float = 1.0):
        super().__init__(k, scaling)
        self.n_group, self.topk_group, self.norm_topk_prob = n_group, topk_group, norm_topk_prob

    @classmethod
    def from_config(cls, cfg):
        r = cfg.router
        return cls(cfg.num_experts_per_tok, r.n_group, r.topk_group, cfg.norm_topk_prob, r.routed_scaling_factor)

    def choose(self, logits, correction_bias=None):
        return sigmoid_group_route(logits, self.k, self.n_group, self.topk_group, correction_bias,
                                   self.norm_topk_prob)

    def pathway(self, logits):
        return jax.nn.sigmoid(logits)

    def select(self, scores, correction_bias=None):
        N, E = scores.shape
        choice = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
        group_scores = jnp.sum(jax.lax.top_k(choice.reshape(N, self.n_group, E // self.n_group), 2)[0], axis=-1)
        choice = jnp.where(_group_mask(group_scores, self.topk_group, E // self.n_group), choice, -jnp.inf)
        _, idx = jax.lax.top_k(choice, self.k)
        weights = jnp.take_along_axis(scores, idx, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return self._finish(weights, idx)


#: RouterConfig.kind -> Router class. A new router: a subclass here and an entry in this table (and
#: its extra weights, if any, in rewire_jax/model/weights.py `_moe`).
ROUTERS = {"softmax_topk": SoftmaxTopK, "group_limited": GroupLimited,
           "topk_softmax": TopKSoftmax, "sigmoid_group": SigmoidGroup}


def router_for(cfg) -> Router:
    """The stock router module of a config."""
    if cfg.router.kind not in ROUTERS:
        raise ValueError(f"unknown router kind {cfg.router.kind!r}")
    return ROUTERS[cfg.router.kind].from_config(cfg)


def route(logits, cfg, correction_bias=None):
    """z~ [N, E] fp32 -> (weights [N, k] fp32 incl. routed_scaling_factor, idx [N, k] int32) by the
    config's stock router. cfg: the ModelConfig (not imported here: config.py validates router
    kinds against ROUTERS)."""
    return router_for(cfg)(logits, correction_bias)


# -- routing from given per-expert scores (a routing override: C3PO re-mixing, rewire_jax/eval/c3po.py) --
#
# A router's *pathway* at a token is the per-expert score vector [E] that its top-k chooses from:
#   softmax_topk (OLMoE, Qwen2/3-MoE, Mixtral), group_limited (DeepSeek-V2), topk_softmax (gpt-oss):
#       p = softmax(z~) over all E (for gpt-oss the top-k of p is the top-k of z~, and p at the
#       chosen k renormalised is its softmax over the k chosen logits);
#   sigmoid_group (DeepSeek-V3): s = sigmoid(z~) (not a distribution; the correction bias is not in it).
# `route_scores` applies the router's own selection rule to such a vector (possibly re-mixed:
# alpha * own + (1 - alpha) * target): group choice (V2: max p per group; V3: top-2 sums of
# s + correction bias), top-k, then the combine weights are the scores at the chosen k, renormalised
# where the router renormalises (norm_topk_prob; gpt-oss always), times routed_scaling_factor.
# route_scores(pathway_scores(z~)) == route(z~) up to rounding (exactly for softmax_topk).

def pathway_scores(logits, cfg):
    """z~ [N, E] fp32 -> the config's router's per-expert scores [N, E] fp32 (see above)."""
    return router_for(cfg).pathway(logits)


def route_scores(scores, cfg, correction_bias=None):
    """scores [N, E] fp32 (pathway_scores, possibly re-mixed) -> (weights [N, k] fp32 incl.
    routed_scaling_factor, idx [N, k] int32) by the config's router's own selection rule."""
    return router_for(cfg).select(scores, correction_bias)
