"""``POST /v1/completions`` (OpenAI's legacy completions, as lm-evaluation-harness's
``local-completions`` uses it): JSON, or an SSE stream of ``text_completion`` events ending
with ``data: [DONE]``. The work is the `CompletionService`'s
(`souverain.server.completions_service`), over the app's `ChatService`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from souverain.server import state
from souverain.server.access import authorize
from souverain.server.completions_service import CompletionService
from souverain.server.keyfile import KeyInfo
from souverain.server.openapi import GENERATION_ERRORS, sse_chunks
from souverain.server.protocol import CompletionRequest, CompletionResponse

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": sse_chunks()},
                              "description": "JSON, or an SSE stream of text_completion "
                                             "events ending with `data: [DONE]` when "
                                             "stream=true"},
                        **GENERATION_ERRORS},
             tags=["completions"], summary="Text completion (OpenAI legacy)")
async def completions(body: CompletionRequest, request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> Response:
    return await CompletionService(state.chat_service(request)).create(request, body, key)
