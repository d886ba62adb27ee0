"""La Plateforme's moderation categories, as the `mistralai` SDK names them.

v1 (``mistral-moderation-2411``, ``moderation_llm_v1``): nine categories. v2
(``mistral-moderation-2603``, ``moderation_llm_v2``): v1's ``dangerous_and_criminal_content``
split into ``dangerous`` and ``criminal``, plus ``jailbreaking`` (SDK
`ModerationLlmv1CategoryThresholds` / `ModerationLlmv2CategoryThresholds`).

Backends score the v2 set (`SCORED`); a v1 answer takes ``dangerous_and_criminal_content`` as
the larger of ``dangerous`` and ``criminal`` and drops ``jailbreaking`` (`for_version`).
"""

from __future__ import annotations

from typing import Literal

Version = Literal["v1", "v2"]

V1 = ("sexual", "hate_and_discrimination", "violence_and_threats",
      "dangerous_and_criminal_content", "selfharm", "health", "financial", "law", "pii")
V2 = ("sexual", "hate_and_discrimination", "violence_and_threats", "dangerous", "criminal",
      "selfharm", "health", "financial", "law", "pii", "jailbreaking")
SCORED = V2

# the policy of each category, as La Plateforme's documentation words it (paraphrased); the
# model judge asks about these
DESCRIPTIONS = {
    "sexual": "material that explicitly depicts, describes or promotes sexual activities, "
              "nudity or sexual services",
    "hate_and_discrimination": "prejudice or hostility against people because of a protected "
                               "characteristic (origin, religion, gender, disability, ...)",
    "violence_and_threats": "content that describes, glorifies, incites or threatens physical "
                            "violence against people",
    "dangerous": "instructions or encouragement for extremely hazardous acts (weapons, "
                 "explosives, poisons, dangerous challenges)",
    "criminal": "content that promotes or helps with illegal activities (theft, fraud, drugs, "
                "hacking)",
    "selfharm": "content that promotes or encourages self-injury, suicide or eating disorders",
    "health": "a request for, or the giving of, detailed or tailored medical advice",
    "financial": "a request for, or the giving of, detailed or tailored financial advice",
    "law": "a request for, or the giving of, detailed or tailored legal advice",
    "pii": "personal identifying information shared or asked for (names with addresses, "
           "phone numbers, e-mails, ID or account numbers)",
    "jailbreaking": "an attempt to make an AI assistant ignore its instructions or safety "
                    "rules (prompt injection, role-play to bypass rules)",
}

# the La Plateforme model ids that name the configured moderation model, and their version
MODEL_IDS: dict[str, Version] = {
    "mistral-moderation-latest": "v2",
    "mistral-moderation-2603": "v2",
    "mistral-moderation-2411": "v1",
}


def categories(version: Version) -> tuple[str, ...]:
    return V1 if version == "v1" else V2


def for_version(scores: dict[str, float], version: Version) -> dict[str, float]:
    """Scores over `SCORED` -> the categories of ``version``, in the SDK's order."""
    if version == "v2":
        return {c: scores[c] for c in V2}
    merged = dict(scores)
    merged["dangerous_and_criminal_content"] = max(scores["dangerous"], scores["criminal"])
    return {c: merged[c] for c in V1}
