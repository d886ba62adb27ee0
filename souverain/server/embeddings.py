"""La Plateforme's (and OpenAI's) embeddings API over the local sentence-transformers model
(`souverain.rag.embed`): the request and response schemas, the `EmbeddingService`, and the
checks and body of one request. The route ``POST /v1/embeddings`` is
`souverain.server.routers.embeddings`.

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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from souverain.errors import SouverainError
from souverain.rag.embed import DEFAULT_EMBED_MODEL, Embedder, get_embedder, resolve_embed_model
from souverain.server.errors import APIError, in_thread
from souverain.server.protocol import ModelCapabilities, ModelCard, _Request

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
                        self._embedder = await in_thread(get_embedder, self.model)
                    except SouverainError as exc:
                        raise APIError(503, f"The embedding model could not be loaded: {exc}",
                                       code="model_load_failed") from None
        return self._embedder

    async def embed(self, body: EmbeddingRequest, texts: list[str],
                    request_id: str) -> tuple[dict[str, Any], int]:
        """(response body, prompt tokens) of one request; the forwards on a worker thread."""
        embedder = await self.embedder()
        check_options(body, embedder.dim)
        result = await in_thread(embedder.embed, texts)
        payload = await in_thread(response_body, body, request_id, result.vectors,
                                          result.total_tokens)
        return payload, result.total_tokens


def served(service: EmbeddingService | None, model: str) -> EmbeddingService:
    """The embedding service if it serves ``model``, else a 404 naming what is served here."""
    if service is None or not service.serves(model):
        names = f"{service.name} (alias {', '.join(service.aliases)})" if service \
            else "none (the server runs with --embed-model none)"
        raise APIError(404, f"Embedding model {model!r} is not served here; the "
                            f"embedding model of this server: {names}.",
                       param="model", code="model_not_found")
    return service


def request_texts(body: EmbeddingRequest) -> list[str]:
    """The texts to embed, or a 400 (token ids, none, more than MAX_INPUTS)."""
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


def check_options(body: EmbeddingRequest, dim: int) -> None:
    """A 400 for an output dtype or a dimension this model does not give."""
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


def response_body(body: EmbeddingRequest, request_id: str, vectors: np.ndarray,
                  tokens: int) -> dict[str, Any]:
    """The response: one embedding per text (floats, or base64 of little-endian float32)."""
    data = []
    for i, v in enumerate(vectors):  # v: (dim,) float32
        emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                    if body.encoding_format == "base64" else v.tolist())
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"id": request_id, "object": "list", "model": body.model, "data": data,
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}}
