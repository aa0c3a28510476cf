"""Estimators and statistics over per-problem scores (pure functions, numpy only).

pass@k (Chen et al. 2021, unbiased from n samples with c correct), maj@k (expected majority-vote
accuracy over all k-subsets of the n samples), Wilson / bootstrap 95% intervals, and the exact
two-sided sign test on paired per-problem differences (= McNemar's exact test when scores are 0/1).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Hashable, Optional, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def maj_at_k(answers: Sequence[Optional[Hashable]], correct: Sequence[bool], k: int,
             max_subsets: int = 20000, seed: int = 0) -> float:
    """Expected accuracy of a majority vote over k of the n samples (uniform over k-subsets).

    answers[i]: the extracted answer of sample i (None: no answer); correct[i]: whether it is right
    (equal answers must have equal correctness). A vote tied between answers gets fractional credit
    (1/#tied if the right answer is among them). Exact over all subsets when C(n, k) <= max_subsets,
    else a seeded Monte-Carlo average over max_subsets subsets."""
    n = len(answers)
    if k > n:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {n}")
    right = {a for a, c in zip(answers, correct) if c and a is not None}
    if math.comb(n, k) <= max_subsets:
        subsets = itertools.combinations(range(n), k)
        total = math.comb(n, k)
    else:
        rng = np.random.default_rng(seed)
        subsets = (rng.choice(n, k, replace=False) for _ in range(max_subsets))
        total = max_subsets
    acc = 0.0
    for s in subsets:
        counts = Counter(answers[i] for i in s if answers[i] is not None)
        if not counts:
            continue
        best = max(counts.values())
        tied = [a for a, v in counts.items() if v == best]
        acc += sum(a in right for a in tied) / len(tied)
    return acc / total


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_ci(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return 0.0, 1.0
    idx = np.random.default_rng(seed).integers(0, len(v), (reps, len(v)))
    means = v[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """95% CI of a mean of per-problem scores: Wilson if all are 0/1, else percentile bootstrap."""
    v = np.asarray(values, float)
    if np.all((v == 0) | (v == 1)):
        return wilson(float(v.sum()), len(v))
    return bootstrap_ci(v)


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of paired scores (a = method, b = baseline, same problems):
    {'better': #a>b, 'worse': #a<b, 'ties', 'p'}. On 0/1 scores this is McNemar's exact test."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same problems: {a.shape} vs {b.shape}")
    up, down = int(np.sum(a > b)), int(np.sum(a < b))
    m = up + down
    tail = sum(math.comb(m, i) for i in range(min(up, down) + 1)) / 2 ** m if m else 1.0
    return {"better": up, "worse": down, "ties": int(len(a) - m), "p": min(1.0, 2 * tail)}
