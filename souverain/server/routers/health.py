"""Operations: ``GET /health`` (liveness, no key needed) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from souverain import __version__
from souverain.server import state
from souverain.server.access import authorize_unmetered
from souverain.server.keyfile import KeyInfo
from souverain.server.openapi import error_responses
from souverain.server.protocol import Health

router = APIRouter()


@router.get("/health", response_model=Health, tags=["ops"], summary="Liveness")
async def health(request: Request) -> Health:
    config = state.config(request)
    return Health(status="ok", models={m.name: "loaded" if m.loaded else "not loaded"
                                       for m in state.registry(request).models},
                  api_keys=config.api_keys is not None, version=__version__,
                  features={"libraries": config.libraries, "fine_tuning": config.finetune,
                            "batch": request.app.state.batch is not None})


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}, **error_responses(401, 403)})
async def prometheus(request: Request,
                     key: KeyInfo | None = Depends(authorize_unmetered)) -> Response:
    body, content_type = state.metrics(request).render()
    return Response(body, media_type=content_type)
