"""Guardrail configs of a chat request (the SDK's `GuardrailConfig`) and their decisions.

A config holds one or both of ``moderation_llm_v1`` / ``moderation_llm_v2``, each with
``custom_category_thresholds`` (category -> threshold in [0, 1], or null for the default),
``ignore_other_categories`` (only the categories given are judged) and ``action``
(``"block"`` or ``"none"``: scores reported, nothing blocked), plus ``block_on_error`` (a
moderation that fails blocks the request, 403; otherwise the request goes on unmoderated).
Unknown fields and categories and thresholds outside [0, 1] are schema errors (422 naming the
field), as the SDK's own models would refuse them.

A category is flagged when its score reaches its threshold (``score >= threshold``);
`DEFAULT_THRESHOLD` where the request gives none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from souverain.moderation.categories import Version, categories, for_version

DEFAULT_THRESHOLD = 0.5

_Threshold = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class V1Thresholds(_Strict):
    sexual: float | None = _Threshold
    hate_and_discrimination: float | None = _Threshold
    violence_and_threats: float | None = _Threshold
    dangerous_and_criminal_content: float | None = _Threshold
    selfharm: float | None = _Threshold
    health: float | None = _Threshold
    financial: float | None = _Threshold
    law: float | None = _Threshold
    pii: float | None = _Threshold


class V2Thresholds(_Strict):
    sexual: float | None = _Threshold
    hate_and_discrimination: float | None = _Threshold
    violence_and_threats: float | None = _Threshold
    dangerous: float | None = _Threshold
    criminal: float | None = _Threshold
    selfharm: float | None = _Threshold
    health: float | None = _Threshold
    financial: float | None = _Threshold
    law: float | None = _Threshold
    pii: float | None = _Threshold
    jailbreaking: float | None = _Threshold


class _LlmConfig(_Strict):
    model_name: Literal["mistral-moderation-latest", "mistral-moderation-2411",
                        "mistral-moderation-2603"] | None = Field(default=None, description=(
                            "Any of these names the server's moderation model."))
    ignore_other_categories: bool = False
    action: Literal["none", "block"] | None = Field(default=None, description=(
        "block (the default) or none (scores reported in the response's `guardrails`)."))


class ModerationLlmV1Config(_LlmConfig):
    custom_category_thresholds: V1Thresholds | None = None


class ModerationLlmV2Config(_LlmConfig):
    custom_category_thresholds: V2Thresholds | None = None


class GuardrailConfig(_Strict):
    """One entry of a chat request's ``guardrails`` list (the SDK's `GuardrailConfig`)."""

    block_on_error: bool = Field(default=False, description=(
        "If true, a moderation that fails blocks the request (403)."))
    moderation_llm_v1: ModerationLlmV1Config | None = None
    moderation_llm_v2: ModerationLlmV2Config | None = None


@dataclass(frozen=True)
class Rule:
    """One moderation to run: a config's v1 or v2 part, flattened."""

    key: str  # "moderation_llm_v1" | "moderation_llm_v2"
    version: Version
    thresholds: dict[str, float]  # the categories judged -> their threshold
    block: bool
    block_on_error: bool

    def needs(self) -> set[str]:
        """The `SCORED` categories this rule reads."""
        need = set(self.thresholds) - {"dangerous_and_criminal_content"}
        if "dangerous_and_criminal_content" in self.thresholds:
            need |= {"dangerous", "criminal"}
        return need

    def judge(self, scores: dict[str, float]) -> dict[str, Any]:
        """Scores over `SCORED` -> this rule's result: scores, thresholds and violations of
        the categories it judges, and whether it blocks."""
        versioned = for_version(scores, self.version)
        judged = {c: round(versioned[c], 6) for c in self.thresholds}
        violations = {c: judged[c] >= t for c, t in self.thresholds.items()}
        return {"scores": judged, "thresholds": dict(self.thresholds), "violations": violations,
                "action": "block" if self.block else "none",
                "blocked": self.block and any(violations.values())}


def rules(configs: list[GuardrailConfig]) -> list[Rule]:
    """The moderations a request's guardrails ask for, in order."""
    out = []
    for cfg in configs:
        for key, version, llm in (("moderation_llm_v1", "v1", cfg.moderation_llm_v1),
                                  ("moderation_llm_v2", "v2", cfg.moderation_llm_v2)):
            if llm is None:
                continue
            given = {c: t for c, t in (llm.custom_category_thresholds.model_dump().items()
                                       if llm.custom_category_thresholds is not None else [])
                     if t is not None}
            if llm.ignore_other_categories:
                thresholds = given
            else:
                thresholds = {c: given.get(c, DEFAULT_THRESHOLD)
                              for c in categories(version)}  # type: ignore[arg-type]
            out.append(Rule(key, version, thresholds,  # type: ignore[arg-type]
                            block=llm.action != "none", block_on_error=cfg.block_on_error))
    return out

