"""A trained classifier as the moderation model: a team moderates by its own policy.

A classifier job (`job_type: "classifier"`) whose targets or labels are named after moderation
categories (`SCORED`: sexual, hate_and_discrimination, ..., pii, jailbreaking; v1's
dangerous_and_criminal_content counts as both dangerous and criminal) scores them:

- a *label* named after a category (``{"labels": {"moderation": ["selfharm", "pii"]}}``, a
  multi-label target, or a single-label target with a ``safe`` label beside the categories):
  the category's score is that label's probability;
- a *target* named after a category (``{"labels": {"selfharm": "yes"}}``): its score is the
  probability of every label that is not a negative one (``no``, ``safe``, ``false``, ``0``,
  ``none``, ``ok``, ``benign``, ``clean``, ``negative``) — ``1 - P(no)`` for yes/no targets.

Targets and labels that name no category are ignored; a category no target names scores 0
(the PII detectors still set ``pii``). `check_targets` refuses, at start, a classifier that
names no category at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from souverain.moderation.categories import SCORED

NEGATIVE_LABELS = frozenset({"no", "safe", "false", "0", "none", "ok", "benign", "clean",
                             "negative", "unflagged", "allowed"})
V1_SPLIT = {"dangerous_and_criminal_content": ("dangerous", "criminal")}


def _categories(name: str) -> tuple[str, ...]:
    key = name.strip().lower()
    if key in V1_SPLIT:
        return V1_SPLIT[key]
    return (key,) if key in SCORED else ()


def category_scores(prediction: dict[str, dict[str, float]]) -> dict[str, float]:
    """One text's classifier output (target -> label -> probability) as category scores."""
    scores: dict[str, float] = {}

    def put(category: str, p: float) -> None:
        scores[category] = max(scores.get(category, 0.0), min(1.0, max(0.0, float(p))))

    for target, labels in prediction.items():
        for label, p in labels.items():
            for c in _categories(label):
                put(c, p)
        named = _categories(target)
        if named:
            positive = [p for label, p in labels.items()
                        if label.strip().lower() not in NEGATIVE_LABELS]
            negative = [p for label, p in labels.items()
                        if label.strip().lower() in NEGATIVE_LABELS]
            total = sum(labels.values())
            if negative and abs(total - 1.0) < 1e-3:  # a softmax: everything but "no"
                value = 1.0 - sum(negative)
            else:  # independent sigmoids (multi-label), or no negative label
                value = max(positive, default=0.0)
            for c in named:
                put(c, value)
    return scores


def check_targets(targets: Sequence[dict[str, Any]], name: str) -> None:
    """A ValueError naming the fix when no target or label of ``name`` is a category."""
    names = [str(t.get("name", "")) for t in targets]
    labels = [str(label) for t in targets for label in (t.get("labels") or [])]
    if not any(_categories(x) for x in names + labels):
        raise ValueError(
            f"{name} cannot serve as the moderation model: none of its targets "
            f"({', '.join(names) or 'none'}) or labels is a moderation category; train it "
            f"with targets or labels named after categories ({', '.join(SCORED)}).")


Predict = Callable[[list[str]], Awaitable[list[dict[str, dict[str, float]]]]]


class ClassifierBackend:
    """`ModerationBackend` over a classifier's predictions (per text: target -> label ->
    probability), e.g. the server's `ClassifierService.classify` for one model."""

    def __init__(self, predict: Predict, name: str):
        self.predict = predict
        self.name = name

    async def score(self, texts: list[str], categories: Sequence[str] = SCORED
                    ) -> list[dict[str, float]]:
        return [category_scores(p) for p in await self.predict(list(texts))]
