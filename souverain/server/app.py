"""The FastAPI app: La Plateforme's API over `AsyncLLMEngine`s.

Routes: ``POST /v1/chat/completions`` (JSON or SSE), ``POST /v1/fim/completions``,
``GET /v1/models``, ``GET /v1/models/{model_id}``, ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /openapi.json``.

Order of checks for a generation request: size limit (413) -> JSON schema (422) -> API key
(401/403) -> rate limit (429 + Retry-After) -> model (404) -> admission queue (429) -> prompt
and parameters (400) -> generation. A client that disconnects aborts its request, which frees
its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from souverain import __version__
from souverain.audit import AuditLog, AuditMiddleware, note
from souverain.finetune.store import JobStore
from souverain.finetune.worker import WorkerProcess
from souverain.paths import libraries_dir
from souverain.server import chat as chatmod
from souverain.server import embeddings, grounding
from souverain.server.auth import APIKeys, AuthError, KeyInfo, is_loopback
from souverain.server.errors import APIError, error_body, install_error_handlers
from souverain.server.finetuning import install as install_finetuning
from souverain.server.libraries import LibraryService
from souverain.server.libraries import install as install_libraries
from souverain.server.metrics import ServerMetrics
from souverain.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorBody,
    FIMCompletionRequest,
    Health,
    ModelCapabilities,
    ModelCard,
    ModelList,
)
from souverain.server.ratelimit import AdmissionQueue, RateLimiter
from souverain.server.registry import FineTuned, ModelRegistry, ServedModel

log = logging.getLogger("souverain.server")

MiB = 1 << 20


@dataclass
class ServerConfig:
    api_keys: APIKeys | None = None
    insecure_no_auth: bool = False
    max_pending: int = 256  # admitted + queued generation requests; more -> 429
    max_request_bytes: int = 4 * MiB
    rate_limit_rpm: float | None = None
    rate_limit_tpm: float | None = None
    default_temperature: float = 0.7
    data_dir: Path | None = None  # document libraries live under data_dir/libraries
    libraries: bool = True  # the Libraries API and the document_library tool
    max_upload_bytes: int = 100 * MiB  # one document upload (multipart) at most
    embed_model: str | None = "souverain-embed"  # POST /v1/embeddings; None = none served
    audit: AuditLog | None = None  # one JSON line per call (souverain.audit)
    finetune: bool = False  # /v1/files + /v1/fine_tuning/jobs (`souverain serve` turns it on)
    finetune_worker: bool = True  # with finetune: run the training worker process alongside
    jobs_db: str | None = None  # jobs database URL; None = sqlite under data_dir/finetune
    max_file_bytes: int = 512 * MiB  # one POST /v1/files upload at most
    finetune_threads: int | None = 1  # torch threads of the worker (None = all cores)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid request", 401: "Missing or invalid API key",
            403: "Not allowed", 404: "Unknown model", 413: "Request body too large",
            422: "Request does not match the schema", 429: "Rate limit or queue full",
            503: "Model cannot be loaded now"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_GEN_ERRORS = _errors(400, 401, 403, 404, 413, 422, 429, 503)


def _inline_schema(model: Any) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined: in /openapi.json a ``#/$defs/..``
    reference would resolve against the document root, where there is no ``$defs``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x: Any) -> Any:
        if isinstance(x, dict):
            ref = x.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in x.items() if k != "$ref"}
                return inline({**defs[ref[len("#/$defs/"):]], **rest})
            return {k: inline(v) for k, v in x.items()}
        if isinstance(x, list):
            return [inline(v) for v in x]
        return x

    return inline(schema)


def _sse_chunks() -> dict[str, Any]:
    """The ``text/event-stream`` media type of a streamed completion, as FastAPI documents SSE
    (OpenAPI 3.2 ``itemSchema``: one SSE event): ``data`` is a chunk as JSON, or ``[DONE]``."""
    return {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"type": "string", "const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": _inline_schema(ChatCompletionChunk)}]}}}}


def _int_bounds(node: Any) -> None:
    """Write the bounds of integer schemas as integers: FastAPI's OpenAPI models turn them into
    floats (``0.0``, and ``9.223372036854775e+18`` whose decimal value is not the bound)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                v = node.get(k)
                if isinstance(v, float) and v.is_integer():
                    node[k] = int(v)
        for v in node.values():
            _int_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _int_bounds(v)


class _BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) before they are read into memory."""

    def __init__(self, app: Any, limit: int, upload_limit: int | None = None,
                 file_limit: int | None = None):
        self.app, self.default, self.upload_limit = app, limit, upload_limit or limit
        self.file_limit = file_limit or self.upload_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _is_file_upload(scope):  # POST /v1/files: its own limit, with multipart slack
            limit, flag = self.file_limit + 64 * 1024, "--max-file-mib"
        elif _is_upload(scope):
            limit, flag = self.upload_limit, "--max-upload-mib"
        else:
            limit, flag = self.default, "--max-request-mib"
        await self._limited(scope, receive, send, limit, flag)

    async def _limited(self, scope: dict, receive: Any, send: Any, limit: int,
                       flag: str) -> None:
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
        if too_big:
            return await self._reject(send, limit, flag)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, self._message(limit, flag))
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send, limit, flag)

    def _message(self, limit: int, flag: str) -> str:
        return (f"The request body is over the server's limit of {limit} bytes; send "
                f"less (or raise {flag}).")

    async def _reject(self, send: Any, limit: int, flag: str) -> None:
        body = json.dumps(error_body(413, self._message(limit, flag))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _is_upload(scope: dict) -> bool:
    """A document upload: POST /v1/libraries/{id}/documents (multipart)."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and path.startswith("/v1/libraries/") \
        and path.rstrip("/").endswith("/documents")


def _is_file_upload(scope: dict) -> bool:
    """A file upload for fine-tuning or batch: POST /v1/files (multipart)."""
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/files"


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI lets it through (it turns other errors raised while
    reading the body into a 400) to the handler that answers 413 in the error shape."""


class _Metrics:
    """ASGI middleware: requests by route template, method and status; duration."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template is None:  # plain Starlette routes (/openapi.json, /docs): fixed paths
                app = scope.get("app")
                path = scope.get("path", "")
                routes = getattr(app, "routes", ())
                template = path if any(getattr(r, "path", None) == path for r in routes) \
                    else "unmatched"
            self.metrics.observe_request(template, scope.get("method", "GET"), status,
                                         time.perf_counter() - start)


def create_app(registry: ModelRegistry, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServerMetrics()
    admission = AdmissionQueue(config.max_pending)
    limiter = (RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm)
               if config.rate_limit_rpm or config.rate_limit_tpm else None)
    for m in registry.models:
        metrics.add_engine_source(m.name, (lambda m=m: m.engine.engine.stats()
                                           if m.engine is not None else None))

    libraries = (LibraryService(libraries_dir(config.data_dir), config.embed_model)
                 if config.libraries else None)
    jobs = JobStore(config.jobs_db, config.data_dir) if config.finetune else None
    worker = WorkerProcess(jobs.url, config.data_dir, config.finetune_threads) \
        if jobs is not None and config.finetune_worker else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
            supervisor = asyncio.create_task(worker.supervise())
        yield
        if worker is not None:
            supervisor.cancel()
            await asyncio.to_thread(worker.stop)
        if libraries is not None:
            libraries.shutdown()
        await asyncio.to_thread(registry.shutdown)
        if config.audit is not None:
            await asyncio.to_thread(config.audit.close)

    app = FastAPI(
        title="souverain — La Plateforme API on your own machine",
        version=__version__,
        description=("Mistral's La Plateforme HTTP API (chat completions, FIM, models) served "
                     "by souverain from open-weight models on this machine. Works unchanged "
                     "with the official `mistralai` and `openai` SDKs."),
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.config = config
    install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _int_bounds(FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_BodyLimit, limit=config.max_request_bytes,
                       upload_limit=config.max_upload_bytes, file_limit=config.max_file_bytes)
    app.add_middleware(_Metrics, metrics=metrics)
    if config.audit is not None:
        app.add_middleware(AuditMiddleware, audit=config.audit)

    async def authorize(request: Request) -> KeyInfo | None:
        keys = config.api_keys
        try:
            if keys is not None:
                key = keys.authenticate(request.headers.get("authorization"))
            elif config.insecure_no_auth:
                key = None
            elif not is_loopback(request.client.host if request.client else None):
                raise APIError(403, "This server has no API keys configured, so it only answers "
                                    "clients on this machine; start it with --api-keys-file "
                                    "(or --insecure-no-auth on a trusted network).",
                               code="no_api_keys")
            else:
                key = None
        except AuthError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            raise APIError(exc.status, exc.message, code=exc.code, headers=headers) from None
        if limiter is not None:
            wait = limiter.check_request(_bucket(key))
            if wait is not None:
                seconds = max(1, math.ceil(wait))
                raise APIError(429, f"Rate limit reached for this API key; retry in {seconds} s.",
                               code="rate_limited", headers={"Retry-After": str(seconds)})
        if key is not None:
            note(request).update(key_id=key.key_id, key_name=key.name)
        return key

    def check_model(key: KeyInfo | None, model: str) -> None:
        if key is not None and config.api_keys is not None:
            try:
                config.api_keys.check_model(key, model)
            except AuthError as exc:
                raise APIError(exc.status, exc.message, code=exc.code) from None

    embed = embeddings.install(app, authorize, check_model,
                               lambda key, n: _charge(limiter, key, n), config.embed_model)

    # -- models, health, metrics ---------------------------------------------------------
    def card(m: ServedModel, name: str | None = None, ft: FineTuned | None = None) -> ModelCard:
        tok = None
        ctx = m.config.max_model_len
        if m.engine is not None:
            tok = m.engine.engine.tokenizer
            ctx = m.engine.engine.max_model_len
        else:
            try:
                ckpt = m.checkpoint()
                tok, ctx = ckpt.tokenizer, ctx or ckpt.args.max_seq_len or 32768
            except Exception:
                pass
        fim = chatmod.fim_capable(tok)
        return ModelCard(
            id=name or m.name, created=m.created, name=m.name,
            aliases=[] if ft else m.aliases,
            description=(f"LoRA adapter {ft.adapter_dir} on {m.name}" if ft
                         else f"{m.model} served by souverain"),
            max_context_length=int(ctx or 0),
            default_model_temperature=config.default_temperature,
            capabilities=ModelCapabilities(completion_chat=bool(tok is not None
                                                                and chatmod.can_chat(tok)),
                                           completion_fim=fim,
                                           function_calling=tok is not None,
                                           fine_tuning=jobs is not None and ft is None),
            loaded=m.loaded,
            **({"type": "fine-tuned", "root": m.name, "job": ft.job} if ft else {}),
        )

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 403, 429),
             tags=["models"], summary="List the models served here")
    async def list_models(key: KeyInfo | None = Depends(authorize)) -> ModelList:
        fine_tuned = [card(registry.find(ft.base), ft.name, ft)
                      for ft in await asyncio.to_thread(registry.fine_tuned)]
        return ModelList(data=[card(m) for m in registry.models] + fine_tuned
                         + ([embed.card()] if embed is not None else []))

    @app.get("/v1/models/{model_id}", response_model=ModelCard,
             responses=_errors(401, 403, 404, 429), tags=["models"],
             summary="One model: context length and capabilities")
    async def get_model(model_id: str, key: KeyInfo | None = Depends(authorize)) -> ModelCard:
        if embed is not None and embed.serves(model_id):
            return embed.card(model_id)
        m, ft = await asyncio.to_thread(registry.resolve, model_id)
        return card(m, model_id, ft)

    @app.get("/health", response_model=Health, tags=["ops"], summary="Liveness")
    async def health() -> Health:
        return Health(status="ok", models={m.name: "loaded" if m.loaded else "not loaded"
                                           for m in registry.models})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}, **_errors(401, 403, 429)})
    async def prometheus(key: KeyInfo | None = Depends(authorize)) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if libraries is not None:
        install_libraries(app, authorize, libraries, max_upload_bytes=config.max_upload_bytes)
    app.state.jobs = jobs  # a JobStore (finetune on) or None
    if jobs is not None:
        registry.fine_tuned_source = jobs.succeeded_models
        install_finetuning(app, authorize, jobs, find_model=lambda n: registry.find(n).model,
                           check_model=check_model, max_file_bytes=config.max_file_bytes)

    # -- generation ----------------------------------------------------------------------
    async def run(request: Request, body: Any, key: KeyInfo | None, kind: str) -> Response:
        note(request)["model"] = body.model
        check_model(key, body.model)
        served, ft = await asyncio.to_thread(registry.resolve, body.model)
        if not admission.try_acquire():
            raise APIError(429, f"The server is at capacity ({config.max_pending} requests "
                                "running or queued); retry shortly.", code="queue_full",
                           headers={"Retry-After": "1"})
        try:
            served, engine = await registry.acquire(served.name)
        except BaseException:
            admission.release()
            raise
        release = _Release(lambda: (registry.release(served), admission.release()))
        try:
            eng = engine.engine
            tok = eng.tokenizer
            if ft is not None:  # a fine-tuned model: its adapter on the base model's engine
                await asyncio.to_thread(registry.ensure_adapter, engine, ft)
            rag = None
            if kind == "chat" and body.tools:
                body, rag = await grounding.ground_chat(body, libraries, tok, eng.max_model_len)
                if rag is not None and not rag.found:
                    return grounding.not_found_response(body, rag)
            if kind == "chat":
                plan = chatmod.plan_chat(body, tok, vocab_size=eng.args.vocab_size,
                                         max_model_len=eng.max_model_len,
                                         default_temperature=config.default_temperature)
            else:
                plan = chatmod.plan_fim(body, tok, max_model_len=eng.max_model_len,
                                        default_temperature=config.default_temperature)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            note(request)["request_id"] = request_id
            gen = engine.generate(plan.prompt_ids, plan.params, request_id,
                                  lora=ft.name if ft is not None else None)
            ctx = _Ctx(request_id=request_id, model=body.model, created=int(time.time()),
                       plan=plan, tok=tok, key=key, rag=rag, audit=note(request))
            if not body.stream:
                return await _complete(request, ctx, gen, metrics, limiter)
            stream = _stream(ctx, gen, metrics, limiter)

            async def guarded() -> AsyncIterator[bytes]:
                try:
                    async for chunk in stream:
                        yield chunk
                finally:
                    await stream.aclose()
                    release()

            # released when the stream ends, or by the background task if it never starts
            response = StreamingResponse(guarded(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(release))
            release.handed_over = True
            return response
        finally:
            if not release.handed_over:
                release()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": _sse_chunks()},
                  "description": "JSON, or an SSE stream of chat.completion.chunk events "
                                 "ending with `data: [DONE]` when stream=true"},
                  **_GEN_ERRORS},
              tags=["chat"], summary="Chat completion (La Plateforme)")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               key: KeyInfo | None = Depends(authorize)) -> Response:
        return await run(request, body, key, "chat")

    @app.post("/v1/fim/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": _sse_chunks()}}, **_GEN_ERRORS},
              tags=["fim"], summary="Fill-in-the-middle completion (Codestral)")
    async def fim_completions(body: FIMCompletionRequest, request: Request,
                              key: KeyInfo | None = Depends(authorize)) -> Response:
        return await run(request, body, key, "fim")

    return app


class _Release:
    """Run a release callback exactly once, whoever gets there first."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.done = False
        self.handed_over = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.fn()


@dataclass
class _Ctx:
    request_id: str
    model: str
    created: int
    plan: chatmod.ChatPlan
    tok: Any
    key: KeyInfo | None
    rag: Any = None  # a souverain.rag.answer.Grounding for a document_library request
    audit: dict[str, Any] | None = None  # the request's audit notes (token counts)


class _Timer:
    """Time to first token and inter-token latency of one request, into the metrics."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = time.perf_counter()
        self.last: float | None = None
        self.tokens = 0

    def tick(self, total_tokens: int) -> None:
        new = total_tokens - self.tokens
        if new <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.metrics.observe_ttft(self.model, t - self.start)
            new -= 1
        else:
            per = (t - self.last) / new
            for _ in range(new):
                self.metrics.observe_itl(self.model, per)
        self.last = t
        self.tokens = total_tokens


def _bucket(key: KeyInfo | None) -> str:
    """The rate-limit bucket of a request: its key id, or one shared bucket without keys."""
    return key.key_id if key else "anonymous"


def _charge(limiter: RateLimiter | None, key: KeyInfo | None, n: int) -> None:
    if limiter is not None:
        limiter.charge_tokens(_bucket(key), n)


async def _complete(request: Request, ctx: _Ctx, gen: AsyncIterator[Any],
                    metrics: ServerMetrics, limiter: RateLimiter | None) -> Response:
    timer = _Timer(metrics, ctx.model)

    async def collect() -> Any:
        last = None
        async for out in gen:
            timer.tick(sum(len(o.token_ids) for o in out.outputs))
            last = out
        return last

    task = asyncio.create_task(collect())
    try:
        while True:
            # a client that left is noticed within 0.1 s: its sequence stops and frees its
            # KV blocks (a tiny model finishes 400 tokens in well under a second)
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                metrics.observe_abort(ctx.model)
                return Response(status_code=499)
    except asyncio.CancelledError:
        task.cancel()
        metrics.observe_abort(ctx.model)
        raise
    final = task.result()
    plan = ctx.plan
    choices = []
    completion = 0
    for o in final.outputs:
        content, calls, reason = chatmod.final_message(plan, o, ctx.tok)
        completion += len(o.token_ids)
        message = {"role": "assistant", "content": content, "tool_calls": calls or None,
                   "prefix": False}
        if ctx.rag is not None:
            message["references"] = ctx.rag.references(content or "")
            if not calls:
                message["content"] = (content or "") + ctx.rag.sources_footer(content or "")
        choice: dict[str, Any] = {"index": o.index, "message": message, "finish_reason": reason}
        if plan.params.logprobs:
            choice["logprobs"] = chatmod.logprobs_body(o.logprobs, ctx.tok)
        choices.append(choice)
    prompt = len(final.prompt_token_ids)
    metrics.observe_tokens(ctx.model, prompt, completion)
    _charge(limiter, ctx.key, prompt + completion)
    if ctx.audit is not None:
        ctx.audit.update(prompt_tokens=prompt, completion_tokens=completion)
    body = {"id": ctx.request_id, "object": "chat.completion", "created": ctx.created,
            "model": ctx.model, "choices": choices, "usage": chatmod.usage(prompt, completion)}
    return JSONResponse(body)


async def _stream(ctx: _Ctx, gen: AsyncIterator[Any], metrics: ServerMetrics,
                  limiter: RateLimiter | None) -> AsyncIterator[bytes]:
    plan = ctx.plan
    timer = _Timer(metrics, ctx.model)
    base = {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
            "model": ctx.model}
    n = plan.params.n
    sent = [0] * n  # characters of content sent per choice
    lp_sent = [0] * n
    done = [False] * n
    finished_ok = False

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: Any = None, usage: dict | None = None) -> bytes:
        c: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            c["logprobs"] = logprobs
        body = dict(base, choices=[c])
        if usage is not None:
            body["usage"] = usage
        return chatmod.sse(body)

    try:
        for i in range(n):
            first = {"role": "assistant", "content": plan.prefix}
            yield chunk(i, first)
        async for out in gen:
            timer.tick(sum(len(o.token_ids) for o in out.outputs))
            for o in out.outputs:
                i = o.index
                if done[i]:
                    continue
                lp = None
                if plan.params.logprobs and o.logprobs is not None and len(o.logprobs) > lp_sent[i]:
                    lp = chatmod.logprobs_body(o.logprobs[lp_sent[i]:], ctx.tok)
                    lp_sent[i] = len(o.logprobs)
                if o.finish_reason is None:
                    text = chatmod.streamable_text(plan, o)
                    if len(text) > sent[i] or lp is not None:
                        yield chunk(i, {"content": text[sent[i]:]}, logprobs=lp)
                        sent[i] = max(sent[i], len(text))
                    continue
                content, calls, reason = chatmod.final_message(plan, o, ctx.tok)
                content = content[len(plan.prefix):]
                delta: dict[str, Any] = {"content": content[sent[i]:] if len(content) > sent[i]
                                         else ""}
                if calls:
                    delta["tool_calls"] = calls
                if ctx.rag is not None:
                    delta["references"] = ctx.rag.references(content)
                    if not calls:
                        delta["content"] += ctx.rag.sources_footer(plan.prefix + content)
                done[i] = True
                usage = None
                if all(done):
                    prompt = len(out.prompt_token_ids)
                    completion = sum(len(x.token_ids) for x in out.outputs)
                    usage = chatmod.usage(prompt, completion)
                    metrics.observe_tokens(ctx.model, prompt, completion)
                    _charge(limiter, ctx.key, prompt + completion)
                    if ctx.audit is not None:
                        ctx.audit.update(prompt_tokens=prompt, completion_tokens=completion)
                yield chunk(i, delta, reason, logprobs=lp, usage=usage)
        finished_ok = True
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # a bug after the 200 went out: say so in the stream, then end it
        log.exception("stream %s failed", ctx.request_id)
        yield chatmod.sse(error_body(500, f"Internal server error while streaming ({type(exc).__name__}"
                                   "); the server log has the details."))
        yield b"data: [DONE]\n\n"
    finally:
        if not finished_ok:
            metrics.observe_abort(ctx.model)
