"""The Files and Fine-tuning jobs routes (``client.files`` and ``client.fine_tuning.jobs`` of
the mistralai SDK) over the `JobStore` on ``app.state``; mounted only with fine-tuning on.

``POST /v1/files`` (multipart ``file`` + ``purpose`` fine-tune|batch), ``GET /v1/files``,
``GET/DELETE /v1/files/{file_id}``, ``GET /v1/files/{file_id}/content``;
``GET/POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{job_id}`` (with events and
checkpoints), ``POST …/{job_id}/cancel``, ``POST …/{job_id}/start``.

Every store call runs on a worker thread; a `JobsError` becomes a 404, 409, 400 or 503 (the
database busy: Retry-After). Query parameters accept what /openapi.json says they accept: an
enum where only some values make sense (a job ``status``, a file ``purpose`` at upload), and
any string where one is a filter (a value that matches nothing gives an empty list).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from souverain import audit
from souverain.finetune.store import JobRecord, JobsError, JobStore
from souverain.server import state
from souverain.server.access import authorize, check_model
from souverain.server.errors import APIError, call_in_thread, in_thread
from souverain.server.finetuning import (
    JobCreate,
    check_job,
    check_job_files,
    check_policy,
    check_upload,
    classifier_targets,
    file_json,
    job_json,
    jobs_api_error,
)
from souverain.server.keyfile import KeyInfo
from souverain.server.uploads import read_upload, upload_name

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {c: {"description": d} for c, d in (
    (400, "Bad request"), (401, "No or bad API key"), (404, "No such file, job or model"),
    (409, "Not allowed in the job's current status"), (413, "Upload too large"),
    (429, "Rate limited"), (503, "The jobs database is busy; retry after Retry-After"))}
JobStatus = Literal["QUEUED", "STARTED", "VALIDATING", "VALIDATED", "RUNNING",
                    "FAILED_VALIDATION", "FAILED", "SUCCESS", "CANCELLED",
                    "CANCELLATION_REQUESTED"]
_FILES: list[str | Enum] = ["files"]
_JOBS: list[str | Enum] = ["fine-tuning"]

_call = partial(call_in_thread, errors=JobsError, translate=jobs_api_error)


# -- files --------------------------------------------------------------------------------
@router.post("/v1/files", tags=_FILES, summary="Upload a file (JSONL) for fine-tuning "
             "or batch", responses=_ERRORS)
async def upload_file(request: Request, file: UploadFile = File(...),
                      purpose: Literal["fine-tune", "batch"] = Form("fine-tune"),
                      # a form field has no null: the schema says integer, absent = none
                      expiry: int = Form(None),
                      visibility: str | None = Form(None),
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    name = upload_name(file, "NAME.jsonl")
    config = state.config(request)
    data = await read_upload(file, name, config.max_file_bytes, what="file",
                             flag="--max-file-mib")
    sample_type, lines = await in_thread(
        check_upload, data, name, purpose, max_line_bytes=config.max_jsonl_line_bytes)
    mime = (file.content_type or "").split(";")[0].strip() or None
    store = state.jobs(request)
    rec = await _call(lambda: store.add_file(data, name, purpose, sample_type=sample_type,
                                             num_lines=lines, mimetype=mime))
    return file_json(rec)


@router.get("/v1/files", tags=_FILES, summary="List files", responses=_ERRORS)
async def list_files(request: Request, page: int = Query(0, ge=0, le=1_000_000),
                     page_size: int = Query(100, ge=1, le=1000),
                     include_total: bool = True,
                     purpose: str | None = None,
                     search: str | None = None,
                     sample_type: list[Literal["instruct", "pretrain", "preference",
                                               "batch_request"]] | None = Query(None),
                     key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    if _has_nul(purpose, search):  # no file has a NUL in these (and PostgreSQL refuses it)
        return {"data": [], "object": "list", "total": 0 if include_total else None}
    store = state.jobs(request)
    files, total = await _call(lambda: store.list_files(
        purpose=purpose, search=search, sample_types=sample_type,
        offset=page * page_size, limit=page_size))
    return {"data": [file_json(f) for f in files], "object": "list",
            "total": total if include_total else None}


@router.get("/v1/files/{file_id}", tags=_FILES, summary="One file's metadata",
            responses=_ERRORS)
async def retrieve_file(file_id: str, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return file_json(await _call(state.jobs(request).get_file, file_id), deleted=False)


@router.delete("/v1/files/{file_id}", tags=_FILES, summary="Delete a file",
               responses=_ERRORS)
async def delete_file(file_id: str, request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    """Erasure: the row and the stored bytes go, and the audit record says what went."""
    rec = await _call(state.jobs(request).delete_file, file_id)
    audit.note(request)["erased"] = {"file_id": rec.id, "bytes": rec.bytes}
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content", tags=_FILES, summary="Download a file",
            responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS})
async def download_file(file_id: str, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> FileResponse:
    rec = await _call(state.jobs(request).get_file, file_id)
    if not Path(rec.path).is_file():
        raise APIError(404, f"The bytes of file {file_id} are missing from "
                            f"{Path(rec.path).parent}; upload it again.", code="not_found")
    return FileResponse(rec.path, media_type="application/octet-stream",
                        filename=rec.filename)


# -- fine-tuning jobs ---------------------------------------------------------------------
async def _job(request: Request, step: Callable[[JobStore, str], JobRecord],
               job_id: str) -> dict[str, Any]:
    """A job after ``step`` (read, cancel or start it), with its events and checkpoints."""
    store = state.jobs(request)
    return await _call(lambda: job_json(step(store, job_id), store))


@router.post("/v1/fine_tuning/jobs", tags=_JOBS, summary="Create a fine-tuning job (LoRA)",
             responses=_ERRORS)
async def create_job(body: JobCreate, request: Request,
                     key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    check_model(request, key, body.model)  # an unknown or forbidden model first: 404 / 403
    if body.job_type == "classifier":
        model, model_path = classifier_base(request, body.model)
    else:
        model, model_path = body.model, state.registry(request).find(body.model).model
    files = check_job(body)
    policy = check_policy(body.evaluation) if body.evaluation is not None else None
    store = state.jobs(request)
    await _call(lambda: check_job_files(
        store, body, [f.file_id for f in files] + list(body.validation_files or [])))
    job = await _call(lambda: store.create_job(
        model=model, model_path=model_path,
        training_files=[f.model_dump() for f in files],
        validation_files=body.validation_files,
        hyperparameters=body.hyperparameters.model_dump(exclude_none=True),
        suffix=body.suffix, auto_start=body.auto_start, job_type=body.job_type,
        classifier_targets=classifier_targets(body), evaluation=policy))
    return await _call(lambda: job_json(job, store))


@router.get("/v1/fine_tuning/jobs", tags=_JOBS, summary="List fine-tuning jobs",
            responses=_ERRORS)
async def list_jobs(request: Request, page: int = Query(0, ge=0, le=1_000_000),
                    page_size: int = Query(100, ge=1, le=1000),
                    model: str | None = None, status: JobStatus | None = None,
                    created_after: datetime | None = Query(None, description=(
                        "An ISO 8601 date-time (or date), or a UNIX time in seconds."),
                        json_schema_extra={"anyOf": [  # what pydantic reads, as /openapi.json
                            {"type": "string", "format": "date-time"},
                            {"type": "string", "format": "date"},
                            {"type": "string", "pattern": r"^-?[0-9]{1,10}(\.[0-9]{1,6})?$"},
                            {"type": "null"}]}),
                    suffix: str | None = None,
                    created_by_me: bool | None = None, wandb_project: str | None = None,
                    wandb_name: str | None = None,
                    key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    if _has_nul(model, suffix):  # no job has a NUL in these (and PostgreSQL refuses it)
        return {"data": [], "object": "list", "total": 0, "has_more": False,
                "total_pages": 0}
    after = _timestamp(created_after) if created_after is not None else None
    store = state.jobs(request)
    jobs, total = await _call(lambda: store.list_jobs(
        model=model, status=status, suffix=suffix, created_after=after,
        offset=page * page_size, limit=page_size))
    return {"data": [job_json(j) for j in jobs], "object": "list", "total": total,
            "has_more": (page + 1) * page_size < total,
            "total_pages": math.ceil(total / page_size) if total else 0}


@router.get("/v1/fine_tuning/jobs/{job_id}", tags=_JOBS,
            summary="One fine-tuning job, with its events and checkpoints", responses=_ERRORS)
async def get_job(job_id: str, request: Request,
                  key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _job(request, JobStore.get_job, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", tags=_JOBS,
             summary="Cancel a job (a running one stops at its next step)", responses=_ERRORS)
async def cancel_job(job_id: str, request: Request,
                     key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _job(request, JobStore.cancel, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/start", tags=_JOBS,
             summary="Start a job created with auto_start=false", responses=_ERRORS)
async def start_job(job_id: str, request: Request,
                    key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _job(request, JobStore.start, job_id)


def classifier_base(request: Request, model: str) -> tuple[str, str]:
    """``(name, what the worker loads)`` of a classifier job's base: the embedding model served
    here (its name, whichever alias the client sent; fast), or a served chat model (its mean
    hidden state). A 404 for any other model."""
    embed = state.embeddings(request)
    if embed is not None and embed.serves(model):
        return embed.name, str(embed.path)
    return model, state.registry(request).find(model).model


def _has_nul(*values: str | None) -> bool:
    return any(v and "\x00" in v for v in values)


def _timestamp(value: datetime) -> float:
    """``created_after`` (an ISO 8601 date-time, or a UNIX time: pydantic reads both) as a
    UNIX time; without a time zone, UTC. Past the ends of `datetime` (year 1 or 9999 shifted
    by its offset), before or after every job."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        return value.timestamp()
    except (OverflowError, ValueError, OSError):
        return -1e18 if value.year < 1970 else 1e18
