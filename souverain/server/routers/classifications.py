"""``POST /v1/classifications`` and ``POST /v1/chat/classifications`` (La Plateforme's
classifiers API; the SDK's ``classifiers.classify`` / ``classify_chat``) over the
`ClassifierService` on ``app.state``: authorization, model permission, the model (404, or 400
for a model that is no classifier), admission (429), then the service. The audit record gets
the model, the request id, the number of inputs and, per input, each target's top label."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from souverain.audit import note
from souverain.server import state
from souverain.server.access import authorize, check_model
from souverain.server.classifications import (
    ChatClassificationRequest,
    ClassificationRequest,
    ClassifierService,
    chat_texts,
    request_texts,
    response_body,
)
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo
from souverain.server.protocol import ErrorBody

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorBody} for c in (400, 401, 403, 404, 413, 422, 429, 503)}


@router.post("/v1/classifications", responses=_ERRORS, tags=["classifiers"],
             summary="Classify texts with a classifier trained here")
async def classify(body: ClassificationRequest, request: Request,
                   key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
    service, model = _service(request, key, body.model)
    return await _run(request, service, model, request_texts(body))


@router.post("/v1/chat/classifications", responses=_ERRORS, tags=["classifiers"],
             summary="Classify conversations with a classifier trained here")
async def classify_chat(body: ChatClassificationRequest, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
    service, model = _service(request, key, body.model)
    return await _run(request, service, model, chat_texts(body))


def _service(request: Request, key: KeyInfo | None,
             model: str) -> tuple[ClassifierService, str]:
    """The service and the model that serves the request (a withdrawn model's replacement),
    once it is known to be a classifier the key may use."""
    note(request)["model"] = model
    model = check_model(request, key, model)
    service = state.classifiers(request)
    if service is None:
        raise APIError(404, "No classifier is served here: classifiers are fine-tuning jobs "
                            "with job_type \"classifier\", and this server runs without the "
                            "jobs database (--no-finetune).", param="model",
                       code="model_not_found")
    if not service.serves(model):
        embed = state.embeddings(request)
        if model in {m.name for m in state.registry(request).models} or \
                (embed is not None and embed.serves(model)) or \
                any(ft.name == model for ft in state.registry(request).fine_tuned()):
            raise APIError(400, f"{model} is not a classifier; give the ft: name of a "
                                "classifier job's model (GET /v1/models: capability "
                                "classification).", param="model", code="not_a_classifier")
        raise APIError(404, f"No classifier model {model!r} here; GET /v1/models lists those "
                            "with the classification capability.", param="model",
                       code="model_not_found")
    return service, model


async def _run(request: Request, service: ClassifierService, model: str,
               texts: list[str]) -> JSONResponse:
    admission = state.admission(request)
    if not admission.try_acquire():
        raise APIError(429, "The server is at capacity; retry shortly.", code="queue_full",
                       headers={"Retry-After": "1"})
    try:
        results = await service.classify(model, texts)
    finally:
        admission.release()
    body = response_body(model, results)
    notes = note(request)
    notes.update(request_id=body["id"], inputs=len(texts),
                 classifications=[{t: max(s, key=s.__getitem__) for t, s in r.items()}
                                  for r in results])
    return JSONResponse(body)
