"""The release gate's rows: a fine-tuning job's evaluation policy and the gate's status, in the
job's own row (`jobs_db.jobs_t`'s ``evaluation*`` columns), shared by every server and worker
on the jobs database.

A job created with an ``evaluation`` policy has its gate ``pending`` from the start. Once the
job is SUCCESS its ``ft:`` model is *held* (not served to ordinary clients, not listed) until
the gate is ``passed`` or ``overridden``. The gate keeper (`souverain.eval.gate`, started by
`souverain serve`) moves it with conditional UPDATEs, so two keepers never run one gate:

    pending --claim--> running --finish--> passed | failed | error
    running --(keeper restarted: `requeue_running`)--> pending
    pending | running | failed | error --release (an admin's override)--> overridden
    failed | error --retry (an admin: evaluate again)--> pending

Every change adds a job event (``evaluation-started``, ``evaluation-passed``,
``evaluation-failed``, ``evaluation-error``, ``evaluation-overridden``) with its reasons.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from souverain.finetune.jobs_db import jobs_t
from souverain.finetune.store import (
    SUCCESS,
    Conflict,
    JobRecord,
    JobStore,
    NotFound,
    _event,
    _job,
)

PENDING, RUNNING, PASSED, FAILED, OVERRIDDEN, ERROR = (
    "pending", "running", "passed", "failed", "overridden", "error")
GATE_STATUSES = (PENDING, RUNNING, PASSED, FAILED, OVERRIDDEN, ERROR)
RELEASED = (PASSED, OVERRIDDEN)
HOLDING = (PENDING, RUNNING, FAILED, ERROR)  # a SUCCESS job's model is held in these


@dataclass(frozen=True)
class Held:
    """A fine-tuned model the gate holds back: its job, the gate's status and its reasons."""

    model: str
    job_id: str
    status: str
    reasons: tuple[str, ...]


class GateRows:
    """The gate columns of the jobs in ``store`` (see the module docstring)."""

    def __init__(self, store: JobStore):
        self.store = store

    def held(self) -> dict[str, Held]:
        """The held ``ft:`` models of SUCCESS jobs, by model id."""
        with self.store.read() as c:
            rows = c.execute(sa.select(jobs_t.c.fine_tuned_model, jobs_t.c.id,
                                       jobs_t.c.evaluation_status, jobs_t.c.evaluation_reasons)
                             .where(jobs_t.c.status == SUCCESS,
                                    jobs_t.c.evaluation_status.in_(HOLDING))).all()
        return {r[0]: Held(r[0], r[1], r[2], tuple(r[3] or ())) for r in rows if r[0]}

    def gate_of(self, model: str) -> Held | None:
        """``model``'s gate, read now: `Held` when a SUCCESS job made it and its gate holds it,
        else None (released, or not the model of a finished job)."""
        with self.store.read() as c:
            row = c.execute(sa.select(jobs_t.c.id, jobs_t.c.evaluation_status,
                                      jobs_t.c.evaluation_reasons)
                            .where(jobs_t.c.fine_tuned_model == model,
                                   jobs_t.c.status == SUCCESS,
                                   jobs_t.c.evaluation_status.in_(HOLDING))).first()
        return None if row is None else Held(model, row[0], row[1], tuple(row[2] or ()))

    def job_of(self, model_or_job: str) -> str:
        """The id of the job that made ``model_or_job`` (an ``ft:`` model id, or a job id);
        `NotFound` naming where to look."""
        with self.store.read() as c:
            job_id = c.execute(sa.select(jobs_t.c.id).where(sa.or_(
                jobs_t.c.fine_tuned_model == model_or_job, jobs_t.c.id == model_or_job))
            ).scalar()
        if job_id is None:
            raise NotFound(f"No fine-tuning job made {model_or_job!r}; give an ft: model id "
                           "or a job id (GET /v1/fine_tuning/jobs lists them).")
        return str(job_id)

    def requeue_running(self, models: Iterable[str] | None = None,
                        owner: str | None = None) -> int:
        """Gates left ``running`` by a keeper that stopped (a crash, a restart) go back to
        ``pending``; with ``models``, only the jobs of these base models; with ``owner``,
        only gates another keeper than ``owner`` holds. Returns how many."""
        cond = [jobs_t.c.evaluation_status == RUNNING]
        if models is not None:
            cond.append(jobs_t.c.model.in_(list(models)))
        if owner is not None:
            cond.append(sa.or_(jobs_t.c.evaluation_owner.is_(None),
                               jobs_t.c.evaluation_owner != owner))
        with self.store.write() as c:
            ids = c.execute(sa.select(jobs_t.c.id).where(*cond)).scalars().all()
            done = 0
            for job_id in ids:
                res = c.execute(jobs_t.update().where(jobs_t.c.id == job_id,
                                                      jobs_t.c.evaluation_status == RUNNING)
                                .values(evaluation_status=PENDING, evaluation_owner=None))
                if res.rowcount == 1:
                    _event(c, job_id, "evaluation-requeued",
                           {"reason": "the gate keeper that ran it stopped; it runs again"})
                    done += 1
        return done

    def claim(self, owner: str, models: Iterable[str] | None = None) -> JobRecord | None:
        """The oldest SUCCESS job whose gate is pending, now ``running`` for ``owner`` (a
        conditional UPDATE: another keeper cannot take it too); None when there is none."""
        cond = [jobs_t.c.status == SUCCESS, jobs_t.c.evaluation_status == PENDING]
        if models is not None:
            cond.append(jobs_t.c.model.in_(list(models)))
        while True:
            with self.store.write() as c:
                job_id = c.execute(sa.select(jobs_t.c.id).where(*cond)
                                   .order_by(jobs_t.c.modified_at, jobs_t.c.id).limit(1)
                                   ).scalar()
                if job_id is None:
                    return None
                res = c.execute(jobs_t.update().where(jobs_t.c.id == job_id,
                                                      jobs_t.c.evaluation_status == PENDING)
                                .values(evaluation_status=RUNNING, evaluation_owner=owner))
                if res.rowcount == 1:
                    job = _job(c, job_id)
                    _event(c, job_id, "evaluation-started",
                           {"policy": job.evaluation, "model": job.fine_tuned_model,
                            "base_model": job.model})
                    return job

    def finish(self, job_id: str, owner: str, status: str, reasons: list[str],
               run_id: str | None, data: dict[str, Any] | None = None) -> bool:
        """``running`` (held by ``owner``) -> passed | failed | error, with its event; False
        when the gate is no longer this keeper's (an admin released it meanwhile)."""
        if status not in (PASSED, FAILED, ERROR):
            raise ValueError(f"a gate finishes passed, failed or error, not {status!r}")
        with self.store.write() as c:
            res = c.execute(jobs_t.update().where(jobs_t.c.id == job_id,
                                                  jobs_t.c.evaluation_status == RUNNING,
                                                  jobs_t.c.evaluation_owner == owner)
                            .values(evaluation_status=status, evaluation_reasons=reasons,
                                    evaluation_run_id=run_id, evaluation_owner=None))
            if res.rowcount != 1:
                return False
            _event(c, job_id, f"evaluation-{status}",
                   {"reasons": reasons, "run_id": run_id, **(data or {})})
            return True

    def retry(self, job_id: str, by: str | None) -> JobRecord:
        """A gate that failed or could not run (``error``: the server was busy, a suite
        broke) is evaluated again: -> ``pending``, with its event. `Conflict` otherwise."""
        with self.store.write() as c:
            before = _job(c, job_id)
            res = c.execute(jobs_t.update().where(jobs_t.c.id == job_id,
                                                  jobs_t.c.evaluation_status.in_((FAILED, ERROR)))
                            .values(evaluation_status=PENDING, evaluation_owner=None))
            if res.rowcount != 1:
                what = ("has no evaluation policy" if before.evaluation is None
                        else f"evaluation is {before.evaluation_status}")
                raise Conflict(f"Job {job_id}'s {what}; only a gate that failed or could not "
                               "run is evaluated again.")
            _event(c, job_id, "evaluation-retry", {
                "by": by, "previous_status": before.evaluation_status,
                "previous_reasons": before.evaluation_reasons or []})
            return _job(c, job_id)

    def release(self, job_id: str, reason: str, by: str | None) -> tuple[JobRecord, JobRecord]:
        """An administrator's override: the held model is released whatever the gate said
        (recorded as ``overridden`` with the reason and who). Returns the job before and
        after. `Conflict` for a job without a policy or already released."""
        with self.store.write() as c:
            before = _job(c, job_id)
            if before.evaluation is None:
                raise Conflict(f"Job {job_id} has no evaluation policy: its model is served "
                               "as soon as it succeeds; there is nothing to release.")
            res = c.execute(jobs_t.update().where(jobs_t.c.id == job_id,
                                                  jobs_t.c.evaluation_status.in_(HOLDING))
                            .values(evaluation_status=OVERRIDDEN, evaluation_owner=None))
            if res.rowcount != 1:
                raise Conflict(f"Job {job_id}'s model is already released (evaluation "
                               f"{before.evaluation_status}).")
            _event(c, job_id, "evaluation-overridden",
                   {"reason": reason, "by": by, "previous_status": before.evaluation_status,
                    "previous_reasons": before.evaluation_reasons or []})
            return before, _job(c, job_id)
