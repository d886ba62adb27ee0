"""``POST /v1/moderations`` and ``POST /v1/chat/moderations`` (the SDK's
``classifiers.moderate`` / ``moderate_chat``) over the `ModerationService` on ``app.state``:
authorization, model permission, input checks (400), admission (429), then the service. The
audit log gets each input's flagged categories (never the text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from souverain.audit import note
from souverain.server import state
from souverain.server.access import authorize, check_model
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo
from souverain.server.moderation import (
    MAX_INPUTS,
    ChatModerationRequest,
    ModerationRequest,
    ModerationResponse,
    conversation_text,
)
from souverain.server.openapi import error_responses
from souverain.server.protocol import Message

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 503)


def _check_count(n: int) -> None:
    if n == 0:
        raise APIError(400, "input is empty; give a text (or a conversation) to moderate.",
                       param="input", code="empty_input")
    if n > MAX_INPUTS:
        raise APIError(400, f"input has {n} items; send at most {MAX_INPUTS} per call.",
                       param="input")


async def _moderate(request: Request, key: KeyInfo | None, model: str, texts: list[str],
                    source: str) -> JSONResponse:
    notes = note(request)
    notes["model"] = model
    model = check_model(request, key, model)  # a withdrawn model's replacement
    service = state.moderation(request)
    service.version(model)  # 404 before any work
    admission = state.admission(request)
    if not admission.try_acquire():
        raise APIError(429, "The server is at capacity; retry shortly.", code="queue_full",
                       headers={"Retry-After": "1"})
    try:
        payload, flagged = await service.respond(model, texts, source)
    finally:
        admission.release()
    notes["request_id"] = payload["id"]
    notes["moderation"] = {"source": source, "flagged": flagged}
    return JSONResponse(payload)


@router.post("/v1/moderations", response_model=ModerationResponse, responses=_ERRORS, tags=["moderation"],
             summary="Moderate texts (category scores and flags)")
async def moderate(body: ModerationRequest, request: Request,
                   key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    _check_count(len(texts))
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input {i} is empty; every text must have content.",
                           param=f"input.{i}", code="empty_input")
    return await _moderate(request, key, body.model, texts, "moderations")


@router.post("/v1/chat/moderations", response_model=ModerationResponse, responses=_ERRORS, tags=["moderation"],
             summary="Moderate conversations (category scores and flags)")
async def moderate_chat(body: ChatModerationRequest, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
    convs: list[list[Message]] = ([body.input] if body.input and isinstance(body.input[0], Message)
                                  else body.input)  # type: ignore[assignment]
    _check_count(len(convs))
    for i, conv in enumerate(convs):
        if not conv:
            raise APIError(400, f"conversation {i} has no message.", param=f"input.{i}",
                           code="empty_input")
    return await _moderate(request, key, body.model, [conversation_text(c) for c in convs],
                           "chat_moderations")
