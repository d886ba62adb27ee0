"""`create_app`: La Plateforme's HTTP API over `AsyncLLMEngine`s, assembled from its parts.

The parts: the shared state on ``app.state`` (`souverain.server.state`), the error handlers
(`souverain.server.errors`), the ASGI middleware (body limit, metrics, audit), and one router
per API family (`souverain.server.routers`), mounted in this order: embeddings, models,
health + metrics, libraries, files + fine-tuning, batch jobs, chat + FIM. A chat request goes to
`routers.chat`, whose handler hands it to `ChatService` (`souverain.server.chat_service`).

Order of checks for a generation request: a key in the URL (401) -> size limit (413) -> JSON
body (422: UTF-8, depth, finite numbers) -> JSON schema (422) -> API key
(401/403) -> rate limit (429 + Retry-After) -> model (404) -> admission queue (429) -> prompt
and parameters (400) -> generation. A client that disconnects aborts its request, which frees
its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from souverain import __version__
from souverain.audit import AuditLog, AuditMiddleware
from souverain.finetune.eval_runs import EvalRunStore
from souverain.finetune.lifecycle import LifecycleStore
from souverain.finetune.release_gate import GateRows
from souverain.finetune.store import JobStore
from souverain.finetune.worker import WorkerProcess
from souverain.paths import libraries_dir
from souverain.server.auth import APIKeys
from souverain.server.batch import BatchService
from souverain.server.chat_service import ChatService
from souverain.server.classifications import ClassifierService
from souverain.server.console import install_console
from souverain.server.docs import install_docs
from souverain.server.embeddings import EmbeddingService
from souverain.server.errors import in_thread, install_error_handlers
from souverain.server.evaluations import EvaluationService, GateKeeper
from souverain.server.libraries import LibraryService
from souverain.server.lifecycle import LifecycleHeaders, LifecycleService
from souverain.server.metrics import ServerMetrics
from souverain.server.middleware import BodyLimit, JSONBodyCheck, KeyInURL, RequestMetrics
from souverain.server.moderation import ModerationService
from souverain.server.openapi import install_openapi
from souverain.server.ratelimit import AdmissionQueue, RateLimiter
from souverain.server.registry import ModelRegistry, ServedModel
from souverain.server.routers import (
    batch,
    chat,
    classifications,
    completions,
    embeddings,
    evaluations,
    files,
    health,
    libraries,
    lifecycle,
    models,
    moderation,
)

MiB = 1 << 20


@dataclass
class ServerConfig:
    """What `souverain serve` sets on the server (each field is one of its options)."""

    api_keys: APIKeys | None = None
    insecure_no_auth: bool = False
    max_pending: int = 256  # admitted + queued generation requests; more -> 429
    max_request_bytes: int = 4 * MiB
    rate_limit_rpm: float | None = None
    rate_limit_tpm: float | None = None
    # a limiter shared with other replicas (`souverain.server.replicas.RemoteRateLimiter`),
    # used instead of this server's own buckets
    rate_limiter: RateLimiter | None = None
    default_temperature: float = 0.7
    data_dir: Path | None = None  # document libraries live under data_dir/libraries
    libraries: bool = True  # the Libraries API and the document_library tool
    # where document bytes and the chunk table live (None: data_dir/libraries), and their
    # metadata database URL (None: sqlite in that folder); shared storage + one PostgreSQL
    # let several servers share the libraries
    libraries_dir: Path | None = None
    libraries_db: str | None = None
    max_upload_bytes: int = 100 * MiB  # one document upload (multipart) at most
    embed_model: str | None = "souverain-embed"  # POST /v1/embeddings; None = none served
    audit: AuditLog | None = None  # one JSON line per call (souverain.audit)
    finetune: bool = False  # /v1/files + /v1/fine_tuning/jobs (`souverain serve` turns it on)
    finetune_worker: bool = True  # with finetune: run the training worker process alongside
    jobs_db: str | None = None  # jobs database URL; None = sqlite under data_dir/finetune
    max_file_bytes: int = 512 * MiB  # one POST /v1/files upload at most
    max_jsonl_line_bytes: int = MiB  # one line of a POST /v1/files upload at most (400 above)
    finetune_threads: int | None = 1  # torch threads of the worker (None = all cores)
    batch: bool = True  # with finetune (the files API): /v1/batch/jobs and their runner
    batch_concurrency: int = 4  # lines of a batch job in flight at once
    moderation_model: str | None = None  # the served model that moderates (None: the first)
    withdrawn_fallback: bool = False  # a withdrawn model's requests go to its replacement
    gate_keeper: GateKeeper | None = None  # the release gate (`serve` builds it: eval layer)
    console: bool = True  # the web console at / (souverain.server.console)


def create_app(registry: ModelRegistry, config: ServerConfig | None = None) -> FastAPI:
    """The app serving ``registry``'s models with ``config`` (defaults: `ServerConfig()`)."""
    config = config or ServerConfig()
    app = FastAPI(
        title="souverain — La Plateforme API on your own machine",
        version=__version__,
        description=("Mistral's La Plateforme HTTP API (chat completions, FIM, models) served "
                     "by souverain from open-weight models on this machine. Works unchanged "
                     "with the official `mistralai` and `openai` SDKs."),
        lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # /docs from local files (server/docs.py)
    )
    _init_state(app, registry, config)
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    if config.console:
        install_console(app)
    # the last added is the outermost: audit -> metrics -> key in URL (401) -> body limit
    # (413) -> JSON body check (422) -> FastAPI
    app.add_middleware(LifecycleHeaders)  # Deprecation / Sunset / model-replaced headers
    app.add_middleware(JSONBodyCheck)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes,
                       upload_limit=config.max_upload_bytes, file_limit=config.max_file_bytes)
    app.add_middleware(KeyInURL)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    if config.audit is not None:
        app.add_middleware(AuditMiddleware, audit=config.audit)
    # the order of the routes is the order of /openapi.json's paths
    app.include_router(embeddings.router)
    app.include_router(models.router)
    app.include_router(lifecycle.router)
    app.include_router(health.router)
    if config.libraries:
        app.include_router(libraries.router)
    if config.finetune:
        app.include_router(files.router)
    if app.state.batch is not None:
        app.include_router(batch.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(moderation.router)
    app.include_router(classifications.router)
    app.include_router(evaluations.router)
    return app


def _init_state(app: FastAPI, registry: ModelRegistry, config: ServerConfig) -> None:
    """Build the shared state (see `souverain.server.state`) onto ``app.state``."""
    metrics = ServerMetrics()
    for m in registry.models:
        metrics.add_engine_source(m.name, _engine_stats(m))
    admission = AdmissionQueue(config.max_pending)
    limiter = config.rate_limiter
    if limiter is None and (config.rate_limit_rpm or config.rate_limit_tpm):
        limiter = RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm)
    library_service = (LibraryService(config.libraries_dir or libraries_dir(config.data_dir),
                                      config.embed_model, config.libraries_db)
                       if config.libraries else None)
    jobs = JobStore(config.jobs_db, config.data_dir) if config.finetune else None
    # the lifecycle rows live in the jobs database (shared by the servers on it), else in a
    # SQLite file of this data folder
    lifecycle_service = LifecycleService(
        LifecycleStore(engine=jobs.engine, url=jobs.url) if jobs is not None
        else LifecycleStore(root=config.data_dir), config.withdrawn_fallback)
    if jobs is not None:
        succeeded = jobs.succeeded_models
        registry.fine_tuned_source = lambda: [row for row in succeeded()
                                              if not lifecycle_service.deleted(row[0])]
    state = app.state
    state.registry, state.config, state.metrics = registry, config, metrics
    state.lifecycle = lifecycle_service
    # evaluation runs beside the lifecycle rows; the release gate's rows are the jobs'
    runs = (EvalRunStore(jobs.url, engine=jobs.engine, root=config.data_dir)
            if jobs is not None else EvalRunStore(root=config.data_dir))
    state.evaluations = EvaluationService(runs, GateRows(jobs) if jobs is not None else None,
                                          config.gate_keeper)
    state.admission, state.limiter = admission, limiter
    state.libraries, state.jobs = library_service, jobs
    # the worker takes only the jobs of the models served here (a shared --jobs-db holds
    # other servers' jobs too)
    state.worker = (WorkerProcess(jobs.url, config.data_dir, config.finetune_threads,
                                  models=[m.name for m in registry.models])
                    if jobs is not None and config.finetune_worker else None)
    # a bad --embed-model fails here, at start-up
    state.embeddings = (EmbeddingService(config.embed_model)
                        if config.embed_model is not None else None)
    # classifier jobs train on the embedding model: the worker takes them too
    if state.worker is not None and state.worker.models is not None \
            and state.embeddings is not None:
        state.worker.models.append(state.embeddings.name)
    state.classifiers = ClassifierService(jobs) if jobs is not None else None
    # the moderation routes and the chat guardrails (a bad --moderation-model fails here)
    state.moderation = ModerationService(registry, config.moderation_model
                                         or registry.models[0].name, metrics.registry,
                                         classifiers=state.classifiers)
    state.chat = ChatService(registry, admission, metrics, limiter, library_service,
                             config.default_temperature)
    state.chat.moderation = state.moderation
    # batch jobs: their rows in the jobs database, their results in the files API
    state.batch = (BatchService(app, jobs, config.batch_concurrency)
                   if jobs is not None and config.batch else None)


def _engine_stats(m: ServedModel) -> Callable[[], dict[str, Any] | None]:
    """``m``'s engine stats, read at each scrape (None while it is not loaded)."""

    def stats() -> dict[str, Any] | None:
        return m.engine.engine.stats() if m.engine is not None else None

    return stats


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the fine-tuning worker (and its supervisor) and the batch runner, and finish
    the fine-tuned model deletions a crash interrupted; at shutdown
    stop the batch runner, the worker, then the ingest thread, the engines and the audit log,
    in that order."""
    state = app.state
    worker: WorkerProcess | None = state.worker
    supervisor = None
    if worker is not None:
        worker.start()
        supervisor = asyncio.create_task(worker.supervise())
    if state.libraries is not None:  # requeue interrupted documents now, on a thread
        state.libraries.start()
    if state.jobs is not None:  # deletions of fine-tuned models a crash interrupted
        await in_thread(state.lifecycle.finish_deletions, state.jobs.succeeded_models)
    batch_runner = asyncio.create_task(state.batch.run()) if state.batch is not None else None
    keeper = state.evaluations.keeper if state.jobs is not None else None
    if keeper is not None:  # the release gate: evaluates the models of finished jobs
        await in_thread(keeper.start)
    yield
    if keeper is not None:  # a running evaluation is abandoned: it runs again next start
        await in_thread(keeper.stop)
    if batch_runner is not None:  # in-flight lines aborted; the job resumes at the next start
        batch_runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await batch_runner
    if worker is not None and supervisor is not None:
        supervisor.cancel()
        await in_thread(worker.stop)
    if state.libraries is not None:
        state.libraries.shutdown()
    await in_thread(state.registry.shutdown)
    if state.config.audit is not None:
        await in_thread(state.config.audit.close)
