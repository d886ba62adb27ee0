"""La Plateforme's batch jobs on this server: the request body of ``POST /v1/batch/jobs``, the
checks of a new job, the JSON shape of a job (the ``mistralai`` SDK's ``BatchJob``), and
`BatchService`, which runs the jobs of the models served here (`souverain.batch.runner`).

Each line of a job runs through the handler of its interactive route (``POST
/v1/chat/completions``, ``/v1/fim/completions``, ``/v1/completions``, ``/v1/embeddings``),
called with the line's body, checked by the route's own schema, and a request object bound to
this app: the same validation, plan, engine and response body as an HTTP call, and a refusal
is the same 4xx body, made by the app's own error handlers. What differs: the line's sequences
have `BATCH` priority (the scheduler admits waiting interactive requests first, and preempts
batch lines first), at most ``concurrency`` lines of a job are in flight, and a line refused
for capacity (429) waits and tries again instead of failing (a 503, a model that cannot be
loaded now, a few times).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from souverain.audit import note
from souverain.batch.lines import ENDPOINTS as ENDPOINT_NAMES
from souverain.batch.lines import InputLine
from souverain.batch.runner import run_job
from souverain.batch.store import BatchJobRecord, BatchStore
from souverain.engine.sampling import BATCH, default_priority
from souverain.finetune.store import JobsError, JobStore, WorkerLock
from souverain.server import state
from souverain.server.access import check_model
from souverain.server.embeddings import EmbeddingRequest, served
from souverain.server.errors import APIError, error_body, in_thread
from souverain.server.finetuning import jobs_api_error
from souverain.server.keyfile import KeyInfo
from souverain.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FIMCompletionRequest,
)
from souverain.server.routers import chat as chat_routes
from souverain.server.routers import completions as completions_routes
from souverain.server.routers import embeddings as embeddings_routes

log = logging.getLogger("souverain.batch")

EndpointName = Literal["/v1/chat/completions", "/v1/fim/completions", "/v1/completions",
                       "/v1/embeddings"]
Handler = Callable[[Any, Request, KeyInfo | None], Awaitable[Response]]
ENDPOINTS: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/chat/completions": (ChatCompletionRequest, chat_routes.chat_completions),
    "/v1/fim/completions": (FIMCompletionRequest, chat_routes.fim_completions),
    "/v1/completions": (CompletionRequest, completions_routes.completions),
    "/v1/embeddings": (EmbeddingRequest, embeddings_routes.embeddings),
}
assert set(get_args(EndpointName)) == set(ENDPOINTS) == set(ENDPOINT_NAMES)
MAX_TIMEOUT_HOURS = 168  # a week: La Plateforme's limit
# a line refused for capacity (429) waits and tries again, as long as the job runs; one
# refused because its model cannot be loaded now (503) tries a few times (~40 s), then fails
MAX_503_RETRIES = 6


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchRequestIn(_Body):
    custom_id: str | None = Field(default=None, description=(
        "Names the request's result line (default: its position, \"0\", \"1\", ...)."))
    body: dict[str, Any] = Field(description="The request the endpoint takes.")


class BatchJobCreate(_Body):
    """La Plateforme's ``CreateBatchJobRequest`` (without ``agent_id``: no agents here)."""

    # exactly one of input_files and requests (the schema says so; the server checks it too)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["input_files"]}, {"required": ["requests"]}]})

    endpoint: EndpointName = Field(description="The route every request runs on.")
    # (absent, never null: the SDK leaves out what is not set)
    input_files: list[str] = Field(
        default=None,  # type: ignore[arg-type]
        min_length=1, description=(
        "Ids of files uploaded with purpose=batch; each line "
        "{\"custom_id\": \"...\", \"body\": {...}}."))
    requests: list[BatchRequestIn] = Field(
        default=None,  # type: ignore[arg-type]
        min_length=1, description=(
        "The requests themselves, instead of input_files."))
    model: str = Field(min_length=1, description="The served model every request runs on.")
    metadata: dict[str, str] | None = None
    timeout_hours: int = Field(default=24, ge=1, le=MAX_TIMEOUT_HOURS, description=(
        f"Hours from creation after which the job stops (1 to {MAX_TIMEOUT_HOURS}): "
        "TIMEOUT_EXCEEDED, keeping the results finished so far."))


def job_json(j: BatchJobRecord) -> dict[str, Any]:
    """A job as the SDK's ``BatchJob``."""
    return {"id": j.id, "object": "batch", "input_files": list(j.input_files),
            "metadata": j.metadata, "endpoint": j.endpoint, "model": j.model,
            "agent_id": None, "output_file": j.output_file, "error_file": j.error_file,
            "errors": list(j.errors), "outputs": None, "status": j.status,
            "created_at": int(j.created_at), "total_requests": j.total_requests,
            "completed_requests": j.completed_requests,
            "succeeded_requests": j.succeeded_requests,
            "failed_requests": j.failed_requests,
            "started_at": int(j.started_at) if j.started_at is not None else None,
            "completed_at": int(j.completed_at) if j.completed_at is not None else None}


def inline_jsonl(requests: list[BatchRequestIn]) -> bytes:
    """Inline requests as the JSONL of an input file (a missing custom_id: its position)."""
    return b"".join(
        json.dumps({"custom_id": r.custom_id if r.custom_id is not None else str(i),
                    "body": r.body}, ensure_ascii=False).encode() + b"\n"
        for i, r in enumerate(requests))


def key_json(key: KeyInfo | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {"key_id": key.key_id, "name": key.name,
            "models": sorted(key.models) if key.models is not None else None}


class BatchService:
    """The batch jobs of one app: their store, the checks of a new job, and the runner that
    takes the jobs of the models served here, one job at a time, ``concurrency`` lines at
    once."""

    def __init__(self, app: FastAPI, jobs: JobStore, concurrency: int = 4):
        self.app = app
        self.executor = LineExecutor(app)
        self.store = BatchStore(jobs)
        self.concurrency = concurrency
        self._wake: asyncio.Event | None = None

    # -- creating a job ---------------------------------------------------------------------
    async def create(self, request: Request, body: BatchJobCreate,
                     key: KeyInfo | None) -> BatchJobRecord:
        # (the schema already refused an unknown endpoint, a missing model, a timeout_hours
        # out of range, an empty list)
        if (body.input_files is None) == (body.requests is None):
            raise APIError(400, "Give either input_files (ids of files uploaded with "
                                "purpose=batch) or requests (the requests inline), not "
                                f"{'both' if body.input_files is not None else 'neither'}.",
                           param="input_files")
        check_model(request, key, body.model)  # 403 for a key without this model
        served_model = await self._served_model(request, body.endpoint, body.model)
        inline = None
        if body.requests is not None:
            inline, total = inline_jsonl(body.requests), len(body.requests)
        else:
            total = await self._call(self._count_lines, body.input_files)
        job = await self._call(lambda: self.store.create(
            model=body.model, served_model=served_model, endpoint=body.endpoint,
            input_files=body.input_files or [], total_requests=total, inline=inline,
            metadata=body.metadata, timeout_hours=body.timeout_hours, key=key_json(key)))
        self.wake()
        return job

    async def _served_model(self, request: Request, endpoint: str, model: str) -> str:
        """The served model a job runs on (the base of a fine-tuned one): 404 if none."""
        if endpoint == "/v1/embeddings":
            return served(state.embeddings(request), model).name
        base, _ = await in_thread(state.registry(request).resolve, model)
        return base.name

    def _count_lines(self, file_ids: list[str]) -> int:
        total = 0
        for file_id in file_ids:
            rec = self.store.jobs.get_file(file_id)  # NotFound -> 404
            if rec.purpose != "batch":
                raise _BadFile(f"File {file_id} ({rec.filename}) was uploaded with purpose "
                               f"{rec.purpose!r}; upload batch requests with purpose=batch.")
            total += rec.num_lines or 0
        return total

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await in_thread(fn, *args)
        except _BadFile as exc:
            raise APIError(400, str(exc), param="input_files", code="wrong_purpose") from None
        except JobsError as exc:
            raise jobs_api_error(exc) from None

    # -- running jobs -----------------------------------------------------------------------
    def models(self) -> list[str]:
        """The served models whose jobs this server runs (the embedding model included)."""
        names = self.app.state.registry.names()
        embeddings = self.app.state.embeddings
        return [*names, *([embeddings.name] if embeddings is not None else [])]

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self, idle_s: float = 2.0) -> None:
        """Take and run jobs until cancelled: a job whose server died first (resumed from its
        journal), then the oldest QUEUED one of a model served here."""
        self._wake = asyncio.Event()
        lock = WorkerLock(self.store.workers_dir)
        try:
            while True:
                try:
                    job = await in_thread(self._next, lock)
                except Exception as exc:  # the database busy or unreachable: try again
                    log.warning("batch jobs: cannot take a job now (%s)", exc)
                    job = None
                if job is None:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), idle_s)
                    continue
                log.info("batch %s: running %d requests on %s", job.id, job.total_requests,
                         job.model)
                execute = functools.partial(self.executor.execute, job.endpoint, job.model,
                                            job.key, job_id=job.id)
                try:
                    await run_job(self.store, job, execute, concurrency=self.concurrency)
                except Exception:  # (the database gone at the end, a bug): retried later
                    log.exception("batch %s: interrupted; it resumes from its journal", job.id)
                    with contextlib.suppress(Exception):
                        await in_thread(self.store.release, job.id)
                    await asyncio.sleep(idle_s)
        finally:
            lock.release()

    def _next(self, lock: WorkerLock) -> BatchJobRecord | None:
        models = self.models()
        for orphan in self.store.orphans(models):
            if self.store.adopt(orphan, lock):
                log.info("batch %s: resuming a job whose server stopped", orphan.id)
                return self.store.get(orphan.id)
        return self.store.claim_next(lock, models)


class LineExecutor:
    """Runs one batch line through its interactive route's handler on ``app`` (see the module
    docstring); the server's jobs and `souverain batch run` both use it."""

    def __init__(self, app: FastAPI):
        self.app = app

    async def execute(self, endpoint: str, model: str, key: dict[str, Any] | None,
                      line: InputLine, job_id: str | None = None) -> tuple[int, dict[str, Any]]:
        """``(status, JSON body)`` of one line, as its interactive route answers it; ``key``:
        the creating key's `key_json` (None: no key). Each attempt is in the server's audit
        log like an HTTP call, with request id ``batch-<job>-<line>``."""
        delay, unavailable, attempt = 0.5, 0, 0
        while True:
            start_wall, start = time.time(), time.perf_counter()
            request = _line_request(self.app, endpoint)
            status, body = await self._once(endpoint, model, key, line, request)
            attempt += 1
            self._audit(request, endpoint, key, line, job_id, status, body, start_wall,
                        time.perf_counter() - start, attempt)
            unavailable += status == 503
            if status != 429 and (status != 503 or unavailable > MAX_503_RETRIES):
                return status, body
            await asyncio.sleep(delay)  # (a cancel of the job interrupts this wait)
            delay = min(delay * 2, 10.0)

    def _audit(self, request: Request, endpoint: str, key: dict[str, Any] | None,
               line: InputLine, job_id: str | None, status: int, body: dict[str, Any],
               start: float, latency_s: float, attempt: int) -> None:
        log_ = getattr(self.app.state.config, "audit", None)
        if log_ is None:
            return
        notes = dict(note(request))
        if key is not None:
            notes.setdefault("key_id", key.get("key_id"))
            notes.setdefault("key_name", key.get("name"))
        notes["request_id"] = f"batch-{job_id or 'offline'}-{line.index}" + (
            f"-{attempt}" if attempt > 1 else "")
        log_.submit({
            "start": start, "latency_s": latency_s, "request_id": notes["request_id"],
            "note": notes, "client_ip": None, "method": "POST", "route": endpoint,
            "status": status, "body": json.dumps(line.body).encode() if line.body else b"",
            "response": json.dumps(body).encode(), "content_type": "application/json"})

    async def _once(self, endpoint: str, model: str, key_info: dict[str, Any] | None,
                    line: InputLine, request: Request) -> tuple[int, dict[str, Any]]:
        schema, handler = ENDPOINTS[endpoint]
        body = dict(line.body or {})
        if body.setdefault("model", model) != model:
            return 400, error_body(400, f"The body names model {body['model']!r} but the batch "
                                        f"runs {model!r}; leave model out of the lines.",
                                   param="model")
        if body.get("stream"):
            return 400, error_body(400, "stream is not supported in a batch (results go to "
                                        "the output file); remove it or set it to false.",
                                   param="stream")
        try:
            key = self._key(key_info)
            parsed = schema.model_validate(body)
            with default_priority(BATCH):  # behind interactive requests in the scheduler
                response = await handler(parsed, request, key)
        except ValidationError as exc:
            return await self._error(request, RequestValidationError(
                exc.errors(include_url=False), body=body))
        except Exception as exc:  # exactly what the app answers an HTTP client
            return await self._error(request, exc)
        raw = bytes(response.body) if hasattr(response, "body") else b"null"
        return response.status_code, json.loads(raw)

    async def _error(self, request: Request, exc: Exception) -> tuple[int, dict[str, Any]]:
        for cls in type(exc).__mro__:
            handler = self.app.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                if not isinstance(response, Response):
                    response = await response
                return response.status_code, json.loads(bytes(response.body))
        raise exc

    def _key(self, key_info: dict[str, Any] | None) -> KeyInfo | None:
        """The API key that created the job, as the server knows it now (a revoked key: 401
        for its remaining lines)."""
        keys = self.app.state.config.api_keys
        if key_info is None or keys is None:
            return None
        for k in keys.keys():
            if k.key_id == key_info["key_id"]:
                return k
        raise APIError(401, "The API key that created this batch job was revoked; its "
                            "remaining requests are not run.", code="key_revoked")


class _BadFile(JobsError):
    """An input file that is not a batch file."""


def _line_request(app: FastAPI, path: str) -> Request:
    """A request bound to ``app`` for one batch line: no client, never disconnected."""
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": [], "client": None, "server": None, "app": app,
        "state": {}}
    return Request(scope, receive)
