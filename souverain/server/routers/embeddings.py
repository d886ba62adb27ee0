"""``POST /v1/embeddings`` (La Plateforme / OpenAI) over the `EmbeddingService` on
``app.state``: authorization, model permission, admission (429), then the service."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from souverain.audit import note
from souverain.server import state
from souverain.server.access import authorize, charge_tokens, check_model
from souverain.server.embeddings import EmbeddingRequest, EmbeddingResponse, request_texts, served
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo
from souverain.server.protocol import ErrorBody

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse,
             responses={c: {"model": ErrorBody} for c in (400, 401, 403, 404, 413, 422, 429,
                                                          503)},
             tags=["embeddings"], summary="Embeddings (La Plateforme / OpenAI)")
async def embeddings(body: EmbeddingRequest, request: Request,
                     key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
    notes = note(request)
    notes["model"] = body.model
    body.model = check_model(request, key, body.model)  # a withdrawn model's replacement
    service = served(state.embeddings(request), body.model)
    texts = request_texts(body)
    admission = state.admission(request)
    if not admission.try_acquire():
        raise APIError(429, "The server is at capacity; retry shortly.", code="queue_full",
                       headers={"Retry-After": "1"})
    request_id = f"embd-{uuid.uuid4().hex}"
    try:
        payload, tokens = await service.embed(body, texts, request_id)
    finally:
        admission.release()
    notes.update(request_id=request_id, prompt_tokens=tokens, completion_tokens=0)
    charge_tokens(state.limiter(request), key, tokens)
    state.metrics(request).observe_tokens(service.name, tokens, 0)
    return JSONResponse(payload)
