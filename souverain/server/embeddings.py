"""``POST /v1/embeddings``: La Plateforme's (and OpenAI's) embeddings API over the local
sentence-transformers model (`souverain.rag.embed`).

The model is served as ``souverain-embed``, with ``mistral-embed`` as an alias so that code
written for La Plateforme runs unchanged. It loads on its first request, on a worker thread;
every forward pass runs on a worker thread too, so the event loop keeps serving chat streams.

Request fields: ``model``, ``input`` (text or list of texts), ``encoding_format``
(``float`` | ``base64``: little-endian float32 bytes, as OpenAI), ``output_dimension`` (Mistral)
or ``dimensions`` (OpenAI), honoured only when equal to the model's dimension (no Matryoshka
truncation here), ``output_dtype`` (``float`` only), and ``metadata`` / ``user`` (accepted,
unused).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from souverain.audit import note
from souverain.errors import SouverainError
from souverain.rag.embed import DEFAULT_EMBED_MODEL, Embedder, get_embedder, resolve_embed_model
from souverain.server.auth import KeyInfo
from souverain.server.errors import APIError
from souverain.server.protocol import ErrorBody, ModelCapabilities, ModelCard, _Request

MAX_INPUTS = 512
ALIASES = ("mistral-embed",)


class EmbeddingRequest(_Request):
    model: str = Field(description="souverain-embed (alias mistral-embed).")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or a list of at most 512 texts, to embed (token-id arrays, which "
                    "the openai SDK allows, are refused with a 400: send text).")
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None, description="float (default) or base64 of little-endian float32.")
    output_dimension: int | None = Field(
        default=None, description="Must equal the model's dimension when given.")
    output_dtype: str | None = Field(default=None, description="float only.")
    dimensions: int | None = Field(default=None, description="OpenAI's name for "
                                                             "output_dimension.")
    metadata: dict[str, Any] | None = Field(default=None, description="Accepted, unused.")
    user: str | None = Field(default=None, description="OpenAI: accepted, unused.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class EmbeddingService:
    """The embedding model this server offers: its names, its card, and the lazily loaded
    `Embedder` (one load, however many requests arrive at once)."""

    def __init__(self, model: str | None = None, name: str = DEFAULT_EMBED_MODEL):
        self.model = model
        self.source = model or DEFAULT_EMBED_MODEL
        self.path = resolve_embed_model(model)  # a bad --embed-model fails at start-up
        self.name = name
        self.aliases = [a for a in ALIASES if a != name]
        self.created = int(time.time())
        self._embedder: Embedder | None = None
        self._loading: asyncio.Lock | None = None

    def serves(self, model: str) -> bool:
        return model == self.name or model in self.aliases

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def max_tokens(self) -> int:
        if self._embedder is not None:
            return self._embedder.max_tokens
        try:
            cfg = json.loads((Path(self.path) / "sentence_bert_config.json").read_text())
            return int(cfg["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            return 512

    def card(self, model_id: str | None = None) -> ModelCard:
        return ModelCard(
            id=model_id or self.name, created=self.created, name=self.name,
            aliases=self.aliases,
            description=f"{self.source} ({self.path}) served by souverain: sentence "
                        "embeddings, L2-normalised",
            max_context_length=self.max_tokens(),
            capabilities=ModelCapabilities(completion_chat=False, completion_fim=False,
                                           function_calling=False, embeddings=True),
            loaded=self.loaded,
        )

    async def embedder(self) -> Embedder:
        if self._embedder is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._embedder is None:
                    try:
                        self._embedder = await asyncio.to_thread(get_embedder, self.model)
                    except SouverainError as exc:
                        raise APIError(503, f"The embedding model could not be loaded: {exc}",
                                       code="model_load_failed") from None
        return self._embedder


def _texts(body: EmbeddingRequest) -> list[str]:
    x = body.input
    if isinstance(x, str):
        return [x]
    if any(not isinstance(t, str) for t in x):
        raise APIError(400, "input holds token ids; this server embeds text only: send the "
                            "text (a string or a list of strings).", param="input")
    if not x:
        raise APIError(400, "input is an empty list; give at least one text to embed.",
                       param="input")
    if len(x) > MAX_INPUTS:
        raise APIError(400, f"input has {len(x)} texts but one request may embed at most "
                            f"{MAX_INPUTS}; split it into several requests.", param="input",
                       code="too_many_inputs")
    return list(x)  # type: ignore[arg-type]


def _check_options(body: EmbeddingRequest, dim: int) -> None:
    if body.output_dtype not in (None, "float"):
        raise APIError(400, f"output_dtype {body.output_dtype!r} is not supported here: this "
                            "server returns float embeddings only (omit output_dtype or send "
                            "'float').", param="output_dtype")
    for field in ("output_dimension", "dimensions"):
        value = getattr(body, field)
        if value is not None and value != dim:
            raise APIError(400, f"{field} {value} is not supported by {body.model}: its "
                                f"embeddings have {dim} dimensions (omit {field} or send "
                                f"{dim}).", param=field)


def _response(body: EmbeddingRequest, request_id: str, vectors: np.ndarray,
              tokens: int) -> dict[str, Any]:
    data = []
    for i, v in enumerate(vectors):  # v: (dim,) float32
        emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                    if body.encoding_format == "base64" else v.tolist())
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"id": request_id, "object": "list", "model": body.model, "data": data,
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}}


def install(app: FastAPI, authorize: Callable[..., Any],
            check_model: Callable[[KeyInfo | None, str], None],
            charge: Callable[[KeyInfo | None, int], None],
            model: str | None) -> EmbeddingService | None:
    """Add ``POST /v1/embeddings`` to ``app``; ``model`` None = no embedding model (404s).
    Returns the service, whose card `GET /v1/models` lists."""
    service = EmbeddingService(model) if model is not None else None
    errors = {c: {"model": ErrorBody} for c in (400, 401, 403, 404, 413, 422, 429, 503)}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors,  # type: ignore[arg-type]
              tags=["embeddings"], summary="Embeddings (La Plateforme / OpenAI)")
    async def embeddings(body: EmbeddingRequest, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> JSONResponse:
        notes = note(request)
        notes["model"] = body.model
        check_model(key, body.model)
        if service is None or not service.serves(body.model):
            served = f"{service.name} (alias {', '.join(service.aliases)})" if service \
                else "none (the server runs with --embed-model none)"
            raise APIError(404, f"Embedding model {body.model!r} is not served here; the "
                                f"embedding model of this server: {served}.",
                           param="model", code="model_not_found")
        texts = _texts(body)
        admission = app.state.admission
        if not admission.try_acquire():
            raise APIError(429, "The server is at capacity; retry shortly.", code="queue_full",
                           headers={"Retry-After": "1"})
        try:
            embedder = await service.embedder()
            _check_options(body, embedder.dim)
            result = await asyncio.to_thread(embedder.embed, texts)
            request_id = f"embd-{uuid.uuid4().hex}"
            payload = await asyncio.to_thread(_response, body, request_id, result.vectors,
                                              result.total_tokens)
        finally:
            admission.release()
        notes.update(request_id=request_id, prompt_tokens=result.total_tokens,
                     completion_tokens=0)
        charge(key, result.total_tokens)
        app.state.metrics.observe_tokens(service.name, result.total_tokens, 0)
        return JSONResponse(payload)

    return service
