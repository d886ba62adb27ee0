"""`ModerationService`: the configured moderation model behind ``POST /v1/moderations``,
``POST /v1/chat/moderations`` and the chat guardrails; request schemas, metrics, model card.

``mistral-moderation-latest`` and ``mistral-moderation-2603`` answer with the v2 categories,
``mistral-moderation-2411`` with v1's; the configured model's own name answers v2. The model
is a served model (`--moderation-model`, default: the first one) acquired from the registry
like a chat request's (lazy load, LRU), with a backend per loaded engine: Llama Guard's format
when its name or path says Llama Guard, else the yes/no judge (`souverain.moderation.judge`);
or, for an ``ft:`` name, a classifier trained here (`souverain.moderation.classifier_backend`).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field

from souverain.errors import RequestError, SouverainError
from souverain.moderation.categories import MODEL_IDS, SCORED, Version
from souverain.moderation.judge import InputTooLong, JudgeBackend, LlamaGuardBackend, is_llama_guard
from souverain.moderation.service import Moderator, Verdict
from souverain.server.errors import APIError
from souverain.server.protocol import (
    Message,
    ModelCapabilities,
    ModelCard,
    TextChunk,
    _Request,
)
from souverain.server.registry import ModelRegistry, ServedModel

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_INPUTS = 128


class ModerationRequest(_Request):
    """The SDK's `ClassificationRequest` (its ``inputs`` travel as ``input``)."""

    model: str = Field(description="mistral-moderation-latest, -2603 (v2) or -2411 (v1).")
    input: str | list[str] = Field(description="A text or a list of texts.")
    metadata: dict[str, Any] | None = None


class ChatModerationRequest(_Request):
    """The SDK's `ChatModerationRequest`: one conversation, or a list of them."""

    model: str
    input: list[Message] | list[list[Message]] = Field(
        description="A conversation (list of messages) or a list of conversations.")


class ModerationObject(BaseModel):
    categories: dict[str, bool] = Field(description="category_scores[c] >= 0.5")
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    """The SDK's `ModerationResponse`: one result per input, in order."""

    id: str
    model: str
    results: list[ModerationObject]


def message_text(m: Message) -> str:
    """A message as the judge reads it: ``Role: text`` (text chunks joined)."""
    content = m.content
    if isinstance(content, list):
        content = "\n".join(c.text for c in content if isinstance(c, TextChunk))
    text = content or ""
    if m.tool_calls:
        text += "\n" + "\n".join(f"{c.function.name}({c.function.arguments})"
                                 for c in m.tool_calls)
    return f"{m.role.capitalize()}: {text}"


def conversation_text(messages: list[Message]) -> str:
    return "\n\n".join(message_text(m) for m in messages)


class ModerationMetrics:
    """Moderation calls, flagged categories and latency, in the server's metrics registry."""

    def __init__(self, registry: CollectorRegistry):
        self.calls = Counter("souverain_moderation_calls",
                             "Moderation calls by source (moderations, chat_moderations, "
                             "guardrail_input, guardrail_output) and outcome.",
                             ["source", "outcome"], registry=registry)
        self.flagged = Counter("souverain_moderation_flagged",
                               "Texts flagged, by category and source (/v1/moderations: score "
                               ">= 0.5; guardrails: the request's thresholds).",
                               ["category", "source"], registry=registry)
        self.duration = Histogram("souverain_moderation_duration_seconds",
                                  "Time to moderate one call's texts.", ["source"],
                                  buckets=DURATION_BUCKETS, registry=registry)


class ModerationService:
    """The moderation model of this server (module docstring)."""

    def __init__(self, registry: ModelRegistry, model_name: str, metrics: CollectorRegistry,
                 classifiers: Any = None):
        self.registry, self.model_name = registry, model_name
        # an `ft:` name: a trained classifier (`ClassifierService`) moderates
        self.classifiers = classifiers if model_name.startswith("ft:") else None
        if model_name.startswith("ft:"):
            self._check_classifier(classifiers, model_name)
        else:
            registry.find(model_name)  # a bad --moderation-model fails at start-up
        self.metrics = ModerationMetrics(metrics)
        self._moderators: dict[int, tuple[object, Moderator]] = {}
        self.created = int(time.time())

    @staticmethod
    def _check_classifier(classifiers: Any, name: str) -> None:
        from souverain.moderation.classifier_backend import check_targets

        if classifiers is None:
            raise SouverainError(f"--moderation-model {name} names a fine-tuned classifier, "
                                 "but this server has no jobs database (--no-finetune); "
                                 "serve with fine-tuning on.")
        job = classifiers.models().get(name)
        if job is None:
            raise SouverainError(f"--moderation-model {name} is no succeeded classifier job "
                                 "of this data folder; `souverain finetune` or GET "
                                 "/v1/models lists the classifiers.")
        try:
            check_targets(job.classifier_targets or [], name)
        except ValueError as exc:
            raise SouverainError(str(exc)) from None

    async def _classifier_moderate(self, texts: list[str], categories: Sequence[str]
                                   ) -> list[Verdict]:
        """The trained classifier's scores (`ClassifierBackend` over the classification
        route's own `ClassifierService.classify`) with the PII detectors."""
        from souverain.moderation.classifier_backend import ClassifierBackend

        classifiers = self.classifiers
        assert classifiers is not None
        predict = functools.partial(classifiers.classify, self.model_name)
        return await Moderator(ClassifierBackend(predict, self.model_name)).moderate(
            texts, categories)

    def version(self, model: str) -> Version:
        """The category set a model id answers with (404 for an id that is not moderation)."""
        if model in MODEL_IDS:
            return MODEL_IDS[model]
        if model == self.model_name:
            return "v2"
        raise APIError(404, f"Model {model!r} is not a moderation model here; use "
                            f"{', '.join(MODEL_IDS)} (served by {self.model_name!r}).",
                       param="model", code="model_not_found")

    def _moderator(self, served: ServedModel, engine: Any) -> Moderator:
        cached = self._moderators.get(id(served))
        if cached is not None and cached[0] is engine:
            return cached[1]
        try:
            backend = (LlamaGuardBackend if is_llama_guard(served.name, str(served.model))
                       else JudgeBackend)(engine, served.name)
        except RequestError as exc:
            raise APIError(503, f"The moderation model cannot judge: {exc}",
                           code="moderation_unavailable") from None
        moderator = Moderator(backend)
        self._moderators[id(served)] = (engine, moderator)
        return moderator

    async def moderate(self, texts: list[str], source: str,
                       categories: Sequence[str] = SCORED) -> list[Verdict]:
        """Scores of ``texts`` (400 naming the input that does not fit the model);
        ``categories``: those the caller reads."""
        start = time.perf_counter()
        outcome = "error"
        if self.classifiers is not None:
            try:
                verdicts = await self._classifier_moderate(texts, categories)
                outcome = "ok"
                return verdicts
            finally:
                self.metrics.calls.labels(source=source, outcome=outcome).inc()
                self.metrics.duration.labels(source=source).observe(
                    time.perf_counter() - start)
        served, engine = await self.registry.acquire(self.model_name)
        try:
            verdicts = await self._moderator(served, engine).moderate(texts, categories)
            outcome = "ok"
            return verdicts
        except InputTooLong as exc:
            outcome = "refused"
            raise APIError(400, str(exc), param=f"input.{exc.index}",
                           code="input_too_long") from None
        except RequestError as exc:
            outcome = "refused"
            raise APIError(400, f"The moderation model refused the input: {exc}",
                           param="input") from None
        except SouverainError as exc:  # e.g. a model without a chat template
            raise APIError(503, f"The moderation model {self.model_name!r} cannot judge: "
                                f"{exc}; choose another with --moderation-model.",
                           code="moderation_unavailable") from None
        finally:
            self.registry.release(served)
            self.metrics.calls.labels(source=source, outcome=outcome).inc()
            self.metrics.duration.labels(source=source).observe(time.perf_counter() - start)

    def count_flags(self, flags: dict[str, bool], source: str) -> None:
        for c, on in flags.items():
            if on:
                self.metrics.flagged.labels(category=c, source=source).inc()

    async def respond(self, model: str, texts: list[str], source: str
                      ) -> tuple[dict[str, Any], list[list[str]]]:
        """The SDK's `ModerationResponse` for ``texts``, and the flagged categories of each
        (for the audit log)."""
        version = self.version(model)
        verdicts = await self.moderate(texts, source)
        results = [v.result(version) for v in verdicts]
        for r in results:
            self.count_flags(r["categories"], source)
        flagged = [[c for c, on in r["categories"].items() if on] for r in results]
        return ({"id": f"mod-{uuid.uuid4().hex}", "model": model, "results": results},
                flagged)

    def card(self, model_id: str | None = None) -> ModelCard:
        if self.classifiers is not None:
            job = self.classifiers.models().get(self.model_name)
            window = self.classifiers.card(self.model_name, job).max_context_length \
                if job is not None else 0
            return ModelCard(
                id=model_id or "mistral-moderation-latest", created=self.created,
                name="mistral-moderation-latest",
                aliases=[n for n in MODEL_IDS if n != "mistral-moderation-latest"],
                description=f"moderation by the trained classifier {self.model_name} + PII "
                            "detectors; v2 categories (-2411: v1)",
                max_context_length=int(window or 0),
                capabilities=ModelCapabilities(completion_chat=False, completion_fim=False,
                                               function_calling=False, moderation=True),
                loaded=True, root=self.model_name)
        m = self.registry.find(self.model_name)
        ctx = m.engine.engine.max_model_len if m.engine is not None else m.config.max_model_len
        if not ctx:  # not loaded: its checkpoint's header says (no tensor read)
            try:
                ctx = m.checkpoint().args.max_seq_len
            except Exception:
                ctx = 0
        return ModelCard(
            id=model_id or "mistral-moderation-latest", created=self.created,
            name="mistral-moderation-latest",
            aliases=[n for n in MODEL_IDS if n != "mistral-moderation-latest"],
            description=(f"moderation by {self.model_name} ("
                         + ("Llama Guard 3 format" if is_llama_guard(m.name, str(m.model))
                            else "yes/no judge from next-token probabilities")
                         + ") + PII detectors; v2 categories (-2411: v1)"),
            max_context_length=int(ctx or 0),
            capabilities=ModelCapabilities(completion_chat=False, completion_fim=False,
                                           function_calling=False, moderation=True),
            loaded=m.loaded, root=self.model_name)

