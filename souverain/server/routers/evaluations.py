"""Evaluation runs in La Plateforme's observability API shapes
(``client.beta.observability.evaluations.runs`` of the mistralai SDK), and the release gate's
override.

``GET /v1/observability/evaluation-runs_v2/{run_id}`` (``runs.get``), ``GET .../{run_id}/
statistics`` (``runs.get_statistics``), ``POST .../search`` (``runs.search_all``: by run ids,
model, suites); souverain's own ``POST /v1/observability/evaluation-runs_v2`` (record a run:
``{"run": <EvalRun JSON>, "html": "<html>..."}``, what `souverain eval run --upload` sends) and
``GET .../{run_id}/report`` (the HTML report: a Content-Security-Policy that forbids every
external load and every script). ``POST /v1/fine_tuning/jobs/{job_id}/release``
(administration, `lifecycle.require_admin`) serves a model its gate holds; the audit record
names the key that did it and the reason; ``POST .../{job_id}/evaluate`` (administration)
runs a gate that failed or could not run again.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from souverain.audit import note
from souverain.finetune.eval_runs import RUN_ID
from souverain.finetune.store import JobsError
from souverain.server import state
from souverain.server.access import authorize
from souverain.server.errors import APIError, call_in_thread, in_thread
from souverain.server.evaluations import (
    REPORT_CSP,
    RecordRun,
    RunFilter,
    finite,
    run_json,
    search_args,
    statistics,
    summary_html,
)
from souverain.server.finetuning import job_json, jobs_api_error
from souverain.server.keyfile import KeyInfo
from souverain.server.lifecycle import require_admin
from souverain.server.openapi import error_responses


class _RunId(Convertor):
    """``{run_id:evaluation_run}``: only an evaluation run id matches, so that
    ``.../evaluation-runs_v2/search`` is the search and nothing else (its ``Allow``: POST)."""

    regex = RUN_ID.pattern.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: Any) -> str:
        return str(value)


register_url_convertor("evaluation_run", _RunId())
router = APIRouter()
_RUNS = "/v1/observability/evaluation-runs_v2"
_RUN = _RUNS + "/{run_id:evaluation_run}"
_TAGS: list[Any] = ["observability"]
_ERRORS = error_responses(400, 401, 403, 404, 409, 429)
_call = partial(call_in_thread, errors=JobsError, translate=jobs_api_error)
SDKUnset = Literal["~?~unset~?~sentinel~?~"]  # what mistralai 3.x sends for an absent body


@router.post(_RUNS, tags=_TAGS, responses=_ERRORS,
             summary="Record an evaluation run (souverain eval run --upload)")
async def record_run(body: RecordRun, request: Request,
                     key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.evaluations(request)
    run = finite(body.run.model_dump(mode="json"))
    candidate = run["candidate"]["model"]
    note(request)["model"] = candidate
    rec = await _call(lambda: service.runs.add(run, body.html, source="upload",
                                               created_by=key.key_id if key else None))
    service.invalidate()
    note(request)["evaluation_run"] = {"id": rec.id, "model": rec.model, "passed": rec.passed}
    return run_json(rec, refs=True)


@router.post(f"{_RUNS}/search", tags=_TAGS, responses=_ERRORS,
             summary="Search evaluation runs (by run ids, model, suites)")
async def search_runs(request: Request, page_size: int = Query(50, ge=1, le=1000),
                      page: int = Query(1, ge=1, le=1_000_000),
                      body: RunFilter | SDKUnset | None = Body(default=None),
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    # (the SDK's search_all() without a filter sends its "unset" sentinel as the body)
    args = search_args(body if isinstance(body, RunFilter) else None)
    runs, total = await _call(lambda: state.evaluations(request).runs.search(
        offset=(page - 1) * page_size, limit=page_size, **args))
    more = page * page_size < total
    return {"runs": {"count": total, "results": [run_json(r, refs=True) for r in runs],
                     "next": f"{_RUNS}/search?page={page + 1}&page_size={page_size}"
                     if more else None,
                     "previous": f"{_RUNS}/search?page={page - 1}&page_size={page_size}"
                     if page > 1 else None}}


@router.get(_RUN, tags=_TAGS, responses=_ERRORS,
            summary="One evaluation run: scores with their intervals, the verdict")
async def get_run(run_id: str, request: Request,
                  key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    rec = await _call(state.evaluations(request).runs.get, run_id)
    return run_json(rec)


@router.get(f"{_RUN}/statistics", tags=_TAGS, responses=_ERRORS,
            summary="An evaluation run's statistics and goal results")
async def get_statistics(run_id: str, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    rec = await _call(state.evaluations(request).runs.get, run_id)
    stats, goals = statistics(rec)
    verdict = rec.run.get("verdict") or None
    return finite({"run_id": rec.id, "statistics": stats, "goal_results": goals,
                   "passed": verdict.get("passed") if verdict else None})


@router.get(f"{_RUN}/report", tags=_TAGS,
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}},
                             "description": "The report (HTML)"}, **_ERRORS},
            summary="An evaluation run's HTML report (self-contained)")
async def get_report(run_id: str, request: Request,
                     key: KeyInfo | None = Depends(authorize)) -> Response:
    rec = await _call(state.evaluations(request).runs.get, run_id)
    # a run recorded without its rendered report gets a plain page of its figures
    html = (await in_thread(Path(rec.html_path or "").read_text, encoding="utf-8")
            if rec.has_report else summary_html(rec))
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_CSP,
                                       "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer"})


def _gates(request: Request, key: KeyInfo | None) -> Any:
    """The release gates' rows, for an administrator (403 / 404 without fine-tuning)."""
    require_admin(request, key)
    gates = state.evaluations(request).gates
    if gates is None:
        raise APIError(404, "Fine-tuning is off on this server (--no-finetune): there is no "
                            "job to release or evaluate.", code="not_found")
    return gates


class Release(BaseModel):
    """``POST /v1/fine_tuning/jobs/{job_id}/release``: why the model is served anyway."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=2000, description=(
        "Why the model is released although its release gate holds it (kept in the job's "
        "events and the audit log)."))


@router.post("/v1/fine_tuning/jobs/{job_id}/release", tags=["fine-tuning"], responses=_ERRORS,
             summary="Serve a fine-tuned model its release gate holds (administration)")
async def release_job(job_id: str, body: Release, request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    gates = _gates(request, key)
    service = state.evaluations(request)
    by = key.key_id if key else None
    before, after = await _call(lambda: gates.release(job_id, body.reason.strip(), by))
    service.invalidate()
    note(request).update(model=after.fine_tuned_model, release={
        "job_id": job_id, "model": after.fine_tuned_model, "reason": body.reason.strip(),
        "by": by, "previous_status": before.evaluation_status,
        "previous_reasons": before.evaluation_reasons or []})
    store = state.jobs(request)
    return await _call(lambda: job_json(store.get_job(job_id), store))


@router.post("/v1/fine_tuning/jobs/{job_id}/evaluate", tags=["fine-tuning"],
             responses=_ERRORS,
             summary="Run a job's release gate again (one that failed or could not run)")
async def evaluate_again(job_id: str, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    gates = _gates(request, key)
    job = await _call(gates.retry, job_id, key.key_id if key else None)
    state.evaluations(request).invalidate()
    note(request).update(model=job.fine_tuned_model, release={
        "job_id": job_id, "model": job.fine_tuned_model, "action": "evaluate-again",
        "by": key.key_id if key else None})
    store = state.jobs(request)
    return await _call(lambda: job_json(store.get_job(job_id), store))
