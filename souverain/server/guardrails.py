"""Guardrails on chat completions: the request's ``guardrails`` configs applied by the
server's `ModerationService`, as three calls `ChatService` makes.

1. `check_input` before generation: the conversation (every message, ``Role: text``) is
   moderated; a blocking rule over its threshold -> 403 (`GuardrailBlocked`), nothing is
   generated.
2. `Guard.check_stream` while an answer streams: every `STREAM_INTERVAL` new characters of a
   choice, the last `STREAM_WINDOW` characters are moderated (windows overlap, so anything
   shorter than the interval is seen whole by some window); a block ends that choice at once
   with ``finish_reason: "content_filter"`` and the results, the stream then ends with
   ``data: [DONE]``; the text that crossed the threshold is not sent.
3. `Guard.check_answer` after generation: each choice's whole answer (its last
   `STREAM_WINDOW` characters for a stream's final check); a block -> 403 with the results.

La Plateforme's documented behaviour (docs.mistral.ai, "Custom Guardrails"): a blocked
request is a 403 whose body has ``error: {message: "Content blocked by guardrail", status:
403}`` and ``guardrails: {results: {<config key>: ...}}`` with per-category scores,
thresholds and violations; ``block_on_error: true`` turns a moderation failure into a 403,
false lets the request through unmoderated. The body here has both that shape and this
server's usual error fields (``object``, ``message``, ``type``, ``param``, ``code``).
``action: "none"`` blocks nothing: the results come back in the response's ``guardrails``
field (the last chunk's, when streaming).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from souverain.moderation.guardrails import GuardrailConfig, Rule, rules
from souverain.server.errors import error_body
from souverain.server.moderation import ModerationService, conversation_text
from souverain.server.protocol import Message

log = logging.getLogger("souverain.server")

STREAM_INTERVAL = 200  # characters of new answer text between two checks of a stream
STREAM_WINDOW = 2 * STREAM_INTERVAL
BLOCKED = "Content blocked by guardrail"


class GuardrailBlocked(Exception):
    """A guardrail stopped the request: its 403 response."""

    def __init__(self, stage: str, results: dict[str, Any], reason: str = BLOCKED):
        super().__init__(reason)
        self.stage, self.results, self.reason = stage, results, reason

    def response(self) -> JSONResponse:
        body = error_body(403, f"{self.reason} ({self.stage}).", param="guardrails",
                          code="guardrail_blocked")
        body["error"] = {"message": self.reason, "status": 403}
        body["guardrails"] = {"stage": self.stage, "results": self.results}
        return JSONResponse(body, status_code=403)


@dataclass
class Guard:
    """The guardrails of one chat request and what they found so far."""

    service: ModerationService
    rules: list[Rule]
    report: dict[str, Any] = field(default_factory=dict)  # stage -> results
    _checked: dict[int, int] = field(default_factory=dict)  # choice -> characters checked
    on_flag: Callable[[str], None] | None = None  # each flagged category (per-model metrics)

    def _flags(self) -> dict[str, Any]:
        return {stage: {k: [c for c, v in r.get("violations", {}).items() if v]
                        for k, r in res.items()} for stage, res in self.report.items()}

    def audit(self) -> dict[str, Any]:
        """What the audit log keeps: the violated categories per stage and rule."""
        return {"source": "guardrails", "flagged": self._flags()}

    def body(self) -> dict[str, Any]:
        """The ``guardrails`` field of a response that was not blocked."""
        return {"results": self.report}

    async def check(self, text: str, stage: str) -> None:
        """Moderate ``text`` under every rule; raise `GuardrailBlocked` when one blocks
        (or when the moderation fails and a rule has ``block_on_error``)."""
        try:
            needed = sorted(set().union(*(r.needs() for r in self.rules)))
            verdict = (await self.service.moderate([text], f"guardrail_{stage}", needed))[0]
        except Exception as exc:
            log.warning("guardrail moderation failed (%s): %s", stage, exc)
            error = {r.key: {"error": str(getattr(exc, "message", exc))} for r in self.rules}
            self.report[stage] = error
            if any(r.block_on_error for r in self.rules):
                raise GuardrailBlocked(stage, error, "Moderation failed and block_on_error "
                                                     "is set") from None
            return
        results = {}
        blocked = False
        for r in self.rules:
            res = r.judge(verdict.scores)
            results[r.key] = res
            blocked = blocked or res["blocked"]
            self.service.count_flags(res["violations"], f"guardrail_{stage}")
            if self.on_flag is not None:
                for category, flagged in res["violations"].items():
                    if flagged:
                        self.on_flag(category)
        self.report[stage] = results
        if blocked:
            raise GuardrailBlocked(stage, results)

    async def check_stream(self, index: int, text: str) -> dict[str, Any] | None:
        """During a stream: the block's results if choice ``index``'s text (all of it so
        far) crossed a threshold at this check, else None (no check due, or passed)."""
        if len(text) - self._checked.get(index, 0) < STREAM_INTERVAL:
            return None
        return await self._check_window(index, text)

    async def check_final(self, index: int, text: str) -> dict[str, Any] | None:
        """At the end of a streamed choice: its last window, unless just checked."""
        if self._checked.get(index) == len(text) or not text.strip():
            return None
        return await self._check_window(index, text)

    async def _check_window(self, index: int, text: str) -> dict[str, Any] | None:
        """The last `STREAM_WINDOW` characters of choice ``index``: the block's results, or
        None when they pass."""
        self._checked[index] = len(text)
        try:
            await self.check(text[-STREAM_WINDOW:], "output")
        except GuardrailBlocked as b:
            return b.results
        return None

    async def check_answer(self, texts: list[str]) -> None:
        """After a JSON completion: every choice's answer (raises `GuardrailBlocked`)."""
        for text in texts:
            if text.strip():
                await self.check(text, "output")


async def check_input(service: ModerationService | None, configs: list[GuardrailConfig] | None,
                      messages: list[Message],
                      on_flag: Callable[[str], None] | None = None) -> Guard | None:
    """The request's `Guard` after moderating its conversation (None without guardrails);
    ``on_flag`` is called with each category its checks flag."""
    if not configs or service is None:
        return None
    guard = Guard(service, rules(configs), on_flag=on_flag)
    if guard.rules:
        await guard.check(conversation_text(messages), "input")
    return guard
