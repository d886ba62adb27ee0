"""La Plateforme's classifiers API over the classifier models trained here: the request and
response schemas (the SDK's ``ClassificationRequest``, ``ChatClassificationRequest``,
``ClassificationResponse``) and the `ClassifierService`. Routes:
`souverain.server.routers.classifications`.

A classifier model is the result of a SUCCESS fine-tuning job with ``job_type: "classifier"``
(`JobStore.succeeded_classifiers`), served as its ``ft:`` name as soon as the job finishes.
It loads on its first request, on a worker thread (a few models stay loaded, least recently
used unloaded first); every forward runs on a worker thread too. A conversation
(``/v1/chat/classifications``) is read as one text, rendered exactly as the training data's
``messages`` were (`souverain.finetune.classifier_data.render_chat`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from souverain.finetune.classifier_data import render_chat
from souverain.finetune.store import JobRecord, JobStore
from souverain.server.errors import APIError, in_thread
from souverain.server.protocol import ModelCapabilities, ModelCard, _Request

if TYPE_CHECKING:
    from souverain.finetune.classifier import ClassifierModel

MAX_INPUTS = 512


class ClassificationRequest(_Request):
    model: str = Field(description="A classifier model trained here (ft:...).")
    input: str | list[str] | None = Field(default=None, description=(
        "Text, or a list of at most 512 texts, to classify."))
    inputs: str | list[str] | None = Field(default=None, description=(
        "Accepted for `input` (the SDK's argument name)."))
    metadata: dict[str, Any] | None = Field(default=None, description="Accepted, unused.")


class InstructRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)


class ChatClassificationRequest(_Request):
    model: str = Field(description="A classifier model trained here (ft:...).")
    input: InstructRequest | list[InstructRequest] = Field(description=(
        "A conversation {\"messages\": [...]}, or a list of them: one result each."))


def request_texts(body: ClassificationRequest) -> list[str]:
    """The texts of a request: 400 when none, too many, or an empty one."""
    if (body.input is None) == (body.inputs is None):
        raise APIError(400, "Give the texts to classify in `input` (a string or a list of "
                            "strings).", param="input")
    value = body.input if body.input is not None else body.inputs
    texts = [value] if isinstance(value, str) else list(value or [])
    return _checked(texts)


def chat_texts(body: ChatClassificationRequest) -> list[str]:
    """One text per conversation, rendered as the training data was."""
    convs = body.input if isinstance(body.input, list) else [body.input]
    for i, c in enumerate(convs):
        for j, m in enumerate(c.messages):
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise APIError(400, f"input[{i}].messages[{j}].role must be system, user, "
                                    "assistant or tool.", param="input")
    return _checked([render_chat(c.messages) for c in convs])


def _checked(texts: list[str]) -> list[str]:
    if not texts:
        raise APIError(400, "input is empty; give at least one text to classify.",
                       param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(texts)} texts; at most {MAX_INPUTS} per "
                            "request: split it.", param="input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input[{i}] is empty; give non-empty text.", param="input")
    return texts


def response_body(model: str, results: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The SDK's ClassificationResponse: per input, per target, ``scores`` label -> p."""
    return {"id": f"clsf-{uuid.uuid4().hex}", "model": model,
            "results": [{target: {"scores": scores} for target, scores in r.items()}
                        for r in results]}


class ClassifierService:
    """The classifier models of the jobs database, loaded on demand (at most ``max_loaded``
    at once, least recently used unloaded first)."""

    def __init__(self, jobs: JobStore, max_loaded: int = 4):
        self.jobs = jobs
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, ClassifierModel] = OrderedDict()
        self._lock: asyncio.Lock | None = None

    def models(self) -> dict[str, JobRecord]:
        """Served classifier names -> their jobs (read from the store: a job that just
        finished is served at once)."""
        return self.jobs.succeeded_classifiers()

    def serves(self, name: str) -> bool:
        return name.startswith("ft:") and name in self.models()

    def card(self, name: str, job: JobRecord) -> ModelCard:
        return ModelCard(
            id=name, created=int(job.modified_at), name=name,
            description=f"Classifier ({', '.join(t['name'] for t in job.classifier_targets or [])}) "
                        f"on {job.model}, trained by job {job.id}",
            max_context_length=_window(job), type="fine-tuned", root=job.model, job=job.id,
            capabilities=ModelCapabilities(completion_chat=False, completion_fim=False,
                                           function_calling=False, classification=True),
            loaded=name in self._loaded)

    def cards(self) -> list[ModelCard]:
        return [self.card(n, j) for n, j in self.models().items()]

    async def model(self, name: str, job: JobRecord) -> ClassifierModel:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            from souverain.finetune.classifier import ClassifierModel

            try:
                m = await in_thread(ClassifierModel.load, str(job.adapter_dir))
            except Exception as exc:
                raise APIError(503, f"The classifier {name} could not be loaded from "
                                    f"{job.adapter_dir}: {exc}", code="model_load_failed"
                               ) from None
            self._loaded[name] = m
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return m

    async def classify(self, name: str, texts: list[str]) -> list[dict[str, dict[str, float]]]:
        from souverain.finetune.classifier import ClassifierInputError

        job = self.models().get(name)
        if job is None:
            raise APIError(404, f"No classifier model {name!r} here; GET /v1/models lists "
                                "those with the classification capability.", param="model",
                           code="model_not_found")
        m = await self.model(name, job)
        try:
            return await in_thread(m.predict, texts)
        except ClassifierInputError as exc:
            raise APIError(400, str(exc).replace("inputs[", "input["), param="input",
                           code="input_too_long" if "tokens long" in str(exc) else None
                           ) from None


def _window(job: JobRecord) -> int:
    try:
        cfg = json.loads((Path(str(job.adapter_dir)) / "classifier.json").read_text())
        return int(cfg["max_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512
