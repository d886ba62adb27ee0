"""``POST /v1/chat/completions`` and ``POST /v1/fim/completions``: JSON, or an SSE stream of
``chat.completion.chunk`` events ending with ``data: [DONE]``. The work is the
`ChatService`'s (`souverain.server.chat_service`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from souverain.server import state
from souverain.server.access import authorize
from souverain.server.keyfile import KeyInfo
from souverain.server.openapi import GENERATION_ERRORS, sse_chunks
from souverain.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    FIMCompletionRequest,
)

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": sse_chunks()},
                              "description": "JSON, or an SSE stream of chat.completion.chunk "
                                             "events ending with `data: [DONE]` when "
                                             "stream=true"},
                        **GENERATION_ERRORS},
             tags=["chat"], summary="Chat completion (La Plateforme)")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           key: KeyInfo | None = Depends(authorize)) -> Response:
    return await state.chat_service(request).create(request, body, key)


@router.post("/v1/fim/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": sse_chunks()}},
                        **GENERATION_ERRORS},
             tags=["fim"], summary="Fill-in-the-middle completion (Codestral)")
async def fim_completions(body: FIMCompletionRequest, request: Request,
                          key: KeyInfo | None = Depends(authorize)) -> Response:
    return await state.chat_service(request).create(request, body, key)
