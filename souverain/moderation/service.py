"""`Moderator`: a backend's category scores combined with the PII detectors.

The PII score is the larger of the backend's and the detectors': a detected identifier
(`souverain.pii`: e-mail, phone, IBAN, card, national id, IP) sets it to `PII_DETECTED`, so a
PII guardrail blocks it whatever the model thinks. Scores are clamped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from souverain.moderation.categories import SCORED, Version, for_version
from souverain.moderation.judge import ModerationBackend
from souverain.pii import pii_kinds

PII_DETECTED = 1.0
FLAG_THRESHOLD = 0.5  # the `categories` booleans of /v1/moderations


@dataclass
class Verdict:
    """One text's moderation: every `SCORED` category's score, and the PII kinds found."""

    scores: dict[str, float]
    pii: list[str] = field(default_factory=list)

    def result(self, version: Version) -> dict[str, dict]:
        """The SDK's `ModerationObject`: ``categories`` (booleans) and ``category_scores``."""
        scores = for_version(self.scores, version)
        return {"categories": {c: s >= FLAG_THRESHOLD for c, s in scores.items()},
                "category_scores": {c: round(s, 6) for c, s in scores.items()}}


class Moderator:
    """Scores texts with ``backend`` and the PII detectors (module docstring)."""

    def __init__(self, backend: ModerationBackend):
        self.backend = backend

    async def moderate(self, texts: list[str], categories: Sequence[str] = SCORED
                       ) -> list[Verdict]:
        """``categories``: those the caller reads (the others score 0 unless the backend
        scored them anyway). When every text has a detected identifier the backend is not
        asked about ``pii``: the detectors already set it to `PII_DETECTED`."""
        found = [sorted(pii_kinds(t)) for t in texts]
        if all(found):
            categories = [c for c in categories if c != "pii"]
        judged = await self.backend.score(texts, categories)
        out = []
        for raw, kinds in zip(judged, found, strict=True):
            scores = {c: min(1.0, max(0.0, float(raw.get(c, 0.0)))) for c in SCORED}
            if kinds:
                scores["pii"] = max(scores["pii"], PII_DETECTED)
            out.append(Verdict(scores, kinds))
        return out
