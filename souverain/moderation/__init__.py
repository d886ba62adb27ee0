"""Moderation: La Plateforme's categories (`categories`), backends that score them (`judge`:
an instruct model's yes/no log-odds, Llama Guard 3), the `Moderator` that adds the PII
detectors of `souverain.pii` (`service`), and the chat guardrails' configs and decisions
(`guardrails`). Cheap to import: torch is imported by `judge` only."""
