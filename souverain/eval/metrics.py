"""The maths of an evaluation, with no dependency beyond the standard library.

Conventions are scikit-learn's, so that numbers here equal `sklearn.metrics` on the same
inputs: a precision with no predicted positive, or a recall with no true positive, is 0.0
(``zero_division=0``); F1 is the harmonic mean of the two (0.0 when both are 0); AUROC is the
Mann-Whitney statistic with tied scores counted as half (= `roc_auc_score`), undefined (None)
unless both classes are present; percentiles interpolate linearly between order statistics
(= `numpy.percentile`'s default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from souverain.eval.suite import Metric


@dataclass(frozen=True)
class Confusion:
    """Counts of one binary decision over a set: flagged (score >= threshold) vs labelled."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def count(cls, y_true: Sequence[bool], y_score: Sequence[float],
              threshold: float) -> Confusion:
        tp = fp = fn = tn = 0
        for truth, score in zip(y_true, y_score, strict=True):
            flagged = score >= threshold
            if truth and flagged:
                tp += 1
            elif truth:
                fn += 1
            elif flagged:
                fp += 1
            else:
                tn += 1
        return cls(tp, fp, fn, tn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        # 2TP / (2TP + FP + FN) = the harmonic mean of precision and recall, 0 when TP = 0
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0


def auroc(y_true: Sequence[bool], y_score: Sequence[float]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting 1/2. Computed from ranks (average ranks for ties):
    AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), R+ = the sum of the positives' ranks.
    None when one class is absent (the area is undefined)."""
    if len(y_true) != len(y_score):
        raise ValueError(f"{len(y_true)} labels for {len(y_score)} scores")
    n_pos = sum(1 for t in y_true if t)
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(y_score)), key=lambda i: y_score[i])
    ranks = [0.0] * len(order)
    i = 0
    while i < len(order):  # a run of equal scores shares the mean of its ranks (1-based)
        j = i
        while j + 1 < len(order) and y_score[order[j + 1]] == y_score[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    rank_sum = sum(r for r, t in zip(ranks, y_true) if t)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- confidence intervals ------------------------------------------------------------------
Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is sensible at 0/n and n/n."""
    if n <= 0:
        raise ValueError("an interval of no observations")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], *, iters: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of a mean (resampling the values
    with replacement ``iters`` times, seeded: the same inputs give the same interval)."""
    import random

    if not values:
        raise ValueError("a mean of no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    tail = (1 - level) / 2 * 100
    return mean, percentile(means, tail), percentile(means, 100 - tail)


def paired_delta(candidate: dict[str, float], base: dict[str, float], *, iters: int = 2000,
                 seed: int = 0) -> tuple[float, float, float, int]:
    """(mean of candidate - base over the example ids both have, low, high, n pairs): the
    paired bootstrap interval of a difference, the honest comparison of two models scored on
    the same examples. Raises when they share no example."""
    ids = sorted(candidate.keys() & base.keys())
    if not ids:
        raise ValueError("the two runs share no example id; run both on the same set")
    diffs = [candidate[i] - base[i] for i in ids]
    mean, low, high = bootstrap_mean(diffs, iters=iters, seed=seed)
    return mean, low, high, len(ids)


def metric_of(name: str, samples: dict[str, float], *, higher_is_better: bool = True,
              description: str = "", seed: int = 0) -> Metric:
    """A `Metric` that is the mean of per-example values: Wilson's interval when every value
    is 0 or 1 (a rate), else the bootstrap's. No samples -> NaN with n = 0 (the report shows
    "no data")."""
    values = list(samples.values())
    if not values:
        return Metric(name, math.nan, None, None, 0, higher_is_better, description, {})
    if all(v in (0.0, 1.0) for v in values):
        mean = sum(values) / len(values)
        low, high = wilson(sum(values), len(values))
    else:
        mean, low, high = bootstrap_mean(values, seed=seed)
    return Metric(name, mean, low, high, len(values), higher_is_better, description,
                  dict(samples))
