"""The batch jobs routes (``client.batch.jobs`` of the mistralai SDK) over the `BatchService`
on ``app.state``; mounted with the files API (results are files: ``client.files.download``).

``POST /v1/batch/jobs``, ``GET /v1/batch/jobs`` (filters: model, created_after, status,
order_by, and metadata: any other query parameter ``key=value``, as the SDK sends it), ``GET /v1/batch/jobs/{job_id}``, ``POST /v1/batch/jobs/{job_id}/cancel``.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from souverain.batch.store import BatchStore
from souverain.finetune.store import JobsError
from souverain.server import state
from souverain.server.access import authorize
from souverain.server.batch import BatchJobCreate, job_json
from souverain.server.errors import call_in_thread
from souverain.server.finetuning import jobs_api_error
from souverain.server.keyfile import KeyInfo
from souverain.server.routers.files import _has_nul, _timestamp

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {c: {"description": d} for c, d in (
    (400, "Bad request (endpoint, files, timeout_hours ...)"), (401, "No or bad API key"),
    (403, "The key may not use this model"), (404, "No such job, file or model"),
    (429, "Rate limited"), (503, "The jobs database is busy; retry after Retry-After"))}
BatchStatus = Literal["QUEUED", "RUNNING", "SUCCESS", "FAILED", "TIMEOUT_EXCEEDED",
                      "CANCELLATION_REQUESTED", "CANCELLED"]
_TAGS: list[str | Enum] = ["batch"]
_LIST_PARAMS = {"page", "page_size", "model", "agent_id", "created_after", "created_by_me",
                "status", "order_by"}

_call = partial(call_in_thread, errors=JobsError, translate=jobs_api_error)


def _store(request: Request) -> BatchStore:
    return state.batch(request).store


@router.post("/v1/batch/jobs", tags=_TAGS, summary="Create a batch job", responses=_ERRORS)
async def create_batch_job(body: BatchJobCreate, request: Request,
                           key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return job_json(await state.batch(request).create(request, body, key))


@router.get("/v1/batch/jobs", tags=_TAGS, summary="List batch jobs", responses=_ERRORS)
async def list_batch_jobs(request: Request, page: int = Query(0, ge=0, le=1_000_000),
                          page_size: int = Query(100, ge=1, le=1000),
                          model: str | None = None, agent_id: str | None = None,
                          created_after: datetime | None = Query(None, description=(
                              "An ISO 8601 date-time (or date), or a UNIX time in seconds."),
                              json_schema_extra={"anyOf": [  # what pydantic reads
                                  {"type": "string", "format": "date-time"},
                                  {"type": "string", "format": "date"},
                                  {"type": "string",
                                   "pattern": r"^-?[0-9]{1,10}(\.[0-9]{1,6})?$"},
                                  {"type": "null"}]}),
                          created_by_me: bool = False,
                          status: list[BatchStatus] | None = Query(None),
                          order_by: Literal["created", "-created"] = "-created",
                          key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    if _has_nul(model, agent_id) or agent_id:  # (no job has an agent here)
        return {"data": [], "object": "list", "total": 0}
    # metadata: the SDK's `metadata={"k": "v"}` arrives as `?k=v` (OpenAPI's form style,
    # exploded): every other query parameter is a metadata key the job must hold
    wanted = {k: v for k, v in request.query_params.items() if k not in _LIST_PARAMS}
    after = _timestamp(created_after) if created_after is not None else None
    store = _store(request)
    jobs, total = await _call(lambda: store.list_jobs(
        model=model, statuses=status, created_after=after, metadata=wanted or None,
        newest_first=order_by == "-created", offset=page * page_size, limit=page_size))
    return {"data": [job_json(j) for j in jobs], "object": "list", "total": total}


@router.get("/v1/batch/jobs/{job_id}", tags=_TAGS, summary="One batch job",
            responses=_ERRORS)
async def get_batch_job(job_id: str, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return job_json(await _call(_store(request).get, job_id))


@router.post("/v1/batch/jobs/{job_id}/cancel", tags=_TAGS,
             summary="Cancel a batch job (a running one stops within a request or two)",
             responses=_ERRORS)
async def cancel_batch_job(job_id: str, request: Request,
                           key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return job_json(await _call(_store(request).cancel, job_id))
