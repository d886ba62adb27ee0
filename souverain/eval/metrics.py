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
