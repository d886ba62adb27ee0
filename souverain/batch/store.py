"""`BatchStore`: batch jobs, in the fine-tuning jobs database.

The rows live beside the fine-tuning tables, in the database a `JobStore` opened (its engine,
its short write / deferred read transactions, its `Busy`), so a server needs one ``--jobs-db``
and the input, output and error files are ordinary files of the files API.

Statuses (La Plateforme's ``BatchJobStatus``): QUEUED -> RUNNING (claimed by a server that
serves the job's model) -> SUCCESS | FAILED | TIMEOUT_EXCEEDED; cancel: QUEUED -> CANCELLED at
once, RUNNING -> CANCELLATION_REQUESTED -> CANCELLED (the runner stops within a line or two).
Every transition is one conditional ``UPDATE ... WHERE status IN (...)``: two servers never
both claim a job and a cancel never overwrites a finished one.

A job's owner is the server process whose `WorkerLock` (a flock under ``batch/workers/``) is
named in ``worker_token``: the kernel drops it when the process dies (kill -9 included), so
the next server on the data folder adopts the job (`orphans`, `adopt`) and resumes it from
its journal (`souverain.batch.lines.Journal`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from souverain.finetune.store import JobStore, NotFound, WorkerLock, this_host
from souverain.sqldb import create_schema

QUEUED, RUNNING, SUCCESS, FAILED = "QUEUED", "RUNNING", "SUCCESS", "FAILED"
TIMEOUT_EXCEEDED, CANCELLATION_REQUESTED, CANCELLED = (
    "TIMEOUT_EXCEEDED", "CANCELLATION_REQUESTED", "CANCELLED")
STATUSES = (QUEUED, RUNNING, SUCCESS, FAILED, TIMEOUT_EXCEEDED, CANCELLATION_REQUESTED,
            CANCELLED)
TERMINAL = (SUCCESS, FAILED, TIMEOUT_EXCEEDED, CANCELLED)
HELD = (RUNNING, CANCELLATION_REQUESTED)  # a server owns the job
STALE_AFTER_S = 60.0  # a heartbeat older than this: the owner is gone (another host's server)

metadata = sa.MetaData()
batch_jobs_t = sa.Table(
    "batch_jobs", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("model", sa.Text, nullable=False),  # the name the client sent
    sa.Column("served_model", sa.Text, nullable=False, index=True),  # the server's model
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("input_files", sa.JSON, nullable=False),  # [file_id]
    sa.Column("inline_path", sa.Text),  # inline `requests`, as JSONL in the job's folder
    sa.Column("metadata", sa.JSON),
    sa.Column("timeout_hours", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("modified_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("total_requests", sa.Integer, nullable=False),
    sa.Column("completed_requests", sa.Integer, nullable=False, default=0),
    sa.Column("succeeded_requests", sa.Integer, nullable=False, default=0),
    sa.Column("failed_requests", sa.Integer, nullable=False, default=0),
    sa.Column("output_file", sa.String(36)),
    sa.Column("error_file", sa.String(36)),
    sa.Column("errors", sa.JSON, nullable=False),  # [{"message", "count"}]: why it FAILED
    sa.Column("key", sa.JSON),  # the creating API key: {"key_id", "name", "models"}
    sa.Column("worker_pid", sa.Integer),
    sa.Column("worker_host", sa.Text),
    sa.Column("worker_token", sa.String(64)),
    sa.Column("heartbeat_at", sa.Float),
)


@dataclass
class BatchJobRecord:
    id: str
    model: str
    served_model: str
    endpoint: str
    input_files: list[str]
    inline_path: str | None
    metadata: dict[str, Any] | None
    timeout_hours: int
    status: str
    created_at: float
    modified_at: float
    started_at: float | None
    completed_at: float | None
    total_requests: int
    completed_requests: int
    succeeded_requests: int
    failed_requests: int
    output_file: str | None
    error_file: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)
    key: dict[str, Any] | None = None
    worker_pid: int | None = None
    worker_host: str | None = None
    worker_token: str | None = None
    heartbeat_at: float | None = None

    @property
    def deadline(self) -> float:
        """When the job times out: ``timeout_hours`` after its creation."""
        return self.created_at + self.timeout_hours * 3600.0


class BatchStore:
    """Batch jobs in the database of ``jobs`` (see the module docstring)."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs
        self.root = jobs.root / "batch"
        self.workers_dir = self.root / "workers"
        create_schema(jobs.engine, metadata)

    def job_dir(self, job_id: str) -> Path:
        """The job's own folder: its inline requests and its journal."""
        return self.root / "jobs" / job_id

    # -- the API's side ---------------------------------------------------------------------
    def create(self, *, model: str, served_model: str, endpoint: str, input_files: list[str],
               total_requests: int, inline: bytes | None = None,
               metadata: dict[str, Any] | None = None, timeout_hours: int = 24,
               key: dict[str, Any] | None = None) -> BatchJobRecord:
        """A QUEUED job (inline requests written first, fsync'd, in its folder)."""
        job_id = str(uuid.uuid4())
        inline_path = None
        if inline is not None:
            path = self.job_dir(job_id) / "requests.jsonl"
            _write_synced(path, inline)
            inline_path = str(path)
        now = time.time()
        rec = BatchJobRecord(
            id=job_id, model=model, served_model=served_model, endpoint=endpoint,
            input_files=list(input_files), inline_path=inline_path, metadata=metadata,
            timeout_hours=timeout_hours, status=QUEUED, created_at=now, modified_at=now,
            started_at=None, completed_at=None, total_requests=total_requests,
            completed_requests=0, succeeded_requests=0, failed_requests=0, output_file=None,
            error_file=None, errors=[], key=key)
        with self.jobs.write() as c:
            c.execute(batch_jobs_t.insert().values(**rec.__dict__))
        return rec

    def get(self, job_id: str) -> BatchJobRecord:
        with self.jobs.read() as c:
            return _job(c, job_id)

    def list_jobs(self, *, model: str | None = None, statuses: Iterable[str] | None = None,
             created_after: float | None = None, metadata: dict[str, Any] | None = None,
             newest_first: bool = True, offset: int = 0,
             limit: int = 100) -> tuple[list[BatchJobRecord], int]:
        """A page of jobs and how many match; ``metadata``: jobs whose metadata holds every
        given key with that value (compared as strings)."""
        cond = []
        if model:
            cond.append(batch_jobs_t.c.model == model)
        if statuses:
            cond.append(batch_jobs_t.c.status.in_(list(statuses)))
        if created_after is not None:
            cond.append(batch_jobs_t.c.created_at > created_after)
        where = sa.and_(sa.true(), *cond)
        created = batch_jobs_t.c.created_at
        order = (created.desc(), batch_jobs_t.c.id) if newest_first else (created,
                                                                          batch_jobs_t.c.id)
        with self.jobs.read() as c:
            rows = c.execute(batch_jobs_t.select().where(where).order_by(*order)
                             ).mappings().all()
        jobs = [BatchJobRecord(**r) for r in rows]
        if metadata:  # (a JSON column: compared here, the same way on SQLite and PostgreSQL)
            want = {str(k): str(v) for k, v in metadata.items()}
            jobs = [j for j in jobs
                    if all(str((j.metadata or {}).get(k)) == v and k in (j.metadata or {})
                           for k, v in want.items())]
        return jobs[offset:offset + limit], len(jobs)

    def cancel(self, job_id: str) -> BatchJobRecord:
        """QUEUED -> CANCELLED at once; RUNNING -> CANCELLATION_REQUESTED (its server stops
        within a line or two). Cancelling a cancelled or finished job changes nothing (La
        Plateforme answers with the job as it is)."""
        with self.jobs.write() as c:
            _job(c, job_id)
            now = time.time()
            if not _transition(c, job_id, (QUEUED,), CANCELLED, completed_at=now):
                _transition(c, job_id, (RUNNING,), CANCELLATION_REQUESTED)
            return _job(c, job_id)

    # -- the runner's side ------------------------------------------------------------------
    def claim_next(self, lock: WorkerLock, models: Iterable[str]) -> BatchJobRecord | None:
        """Atomically take the oldest QUEUED job of one of ``models`` (-> RUNNING, owned by
        this process's ``lock``); None if there is none."""
        where = sa.and_(batch_jobs_t.c.status == QUEUED,
                        batch_jobs_t.c.served_model.in_(list(models)))
        while True:
            with self.jobs.write() as c:
                job_id = c.execute(sa.select(batch_jobs_t.c.id).where(where)
                                   .order_by(batch_jobs_t.c.created_at, batch_jobs_t.c.id)
                                   .limit(1)).scalar()
                if job_id is None:
                    return None
                now = time.time()
                if _transition(c, job_id, (QUEUED,), RUNNING, started_at=now,
                               **_owner(lock)):
                    return _job(c, job_id)

    def orphans(self, models: Iterable[str], *,
                stale_after: float = STALE_AFTER_S) -> list[BatchJobRecord]:
        """Held jobs of ``models`` whose server is gone: its lock under this data folder is
        free (it ended, however), or, without a lock file here, its heartbeat is stale."""
        where = sa.and_(batch_jobs_t.c.status.in_(HELD),
                        batch_jobs_t.c.served_model.in_(list(models)))
        with self.jobs.read() as c:
            rows = c.execute(batch_jobs_t.select().where(where)
                             .order_by(batch_jobs_t.c.created_at)).mappings().all()
        now = time.time()
        out = []
        for r in rows:
            job = BatchJobRecord(**r)
            held = WorkerLock.held(self.workers_dir, job.worker_token)
            if job.worker_token is None or held is False \
                    or (held is None and now - (job.heartbeat_at or 0) > stale_after):
                out.append(job)
        return out

    def adopt(self, job: BatchJobRecord, lock: WorkerLock) -> bool:
        """Take over an orphaned job, unless another server did first (compare-and-set on
        its owner)."""
        owner = (batch_jobs_t.c.worker_token == job.worker_token if job.worker_token
                 else batch_jobs_t.c.worker_token.is_(None))
        with self.jobs.write() as c:
            res = c.execute(batch_jobs_t.update()
                            .where(batch_jobs_t.c.id == job.id,
                                   batch_jobs_t.c.status == job.status, owner)
                            .values(modified_at=time.time(), **_owner(lock)))
            return res.rowcount == 1

    def progress(self, job_id: str, *, completed: int, succeeded: int, failed: int) -> str:
        """Record the live counters and the heartbeat; returns the job's status now (a cancel
        request shows up here)."""
        with self.jobs.write() as c:
            c.execute(batch_jobs_t.update().where(batch_jobs_t.c.id == job_id)
                      .values(completed_requests=completed, succeeded_requests=succeeded,
                              failed_requests=failed, heartbeat_at=time.time()))
            return str(c.execute(sa.select(batch_jobs_t.c.status)
                                 .where(batch_jobs_t.c.id == job_id)).scalar_one())

    def set_files(self, job_id: str, *, output_file: str | None,
                  error_file: str | None) -> None:
        with self.jobs.write() as c:
            c.execute(batch_jobs_t.update().where(batch_jobs_t.c.id == job_id)
                      .values(output_file=output_file, error_file=error_file,
                              modified_at=time.time()))

    def finish(self, job_id: str, status: str, *, errors: list[dict[str, Any]] | None = None,
               expect: Iterable[str] = HELD) -> bool:
        """The final ``status`` (owner released, ``completed_at`` set) if the job is still in
        one of ``expect``."""
        values: dict[str, Any] = {"completed_at": time.time(), "worker_pid": None,
                                  "worker_token": None}
        if errors is not None:
            values["errors"] = errors
        with self.jobs.write() as c:
            return _transition(c, job_id, tuple(expect), status, **values)

    def release(self, job_id: str) -> None:
        """Leave a held job without an owner (the server stops): the next one resumes it."""
        with self.jobs.write() as c:
            c.execute(batch_jobs_t.update().where(batch_jobs_t.c.id == job_id)
                      .values(worker_token=None, worker_pid=None, modified_at=time.time()))


def _owner(lock: WorkerLock) -> dict[str, Any]:
    return {"worker_token": lock.token, "worker_pid": os.getpid(), "worker_host": this_host(),
            "heartbeat_at": time.time()}


def _job(c: Connection, job_id: str) -> BatchJobRecord:
    row = None if "\x00" in job_id else \
        c.execute(batch_jobs_t.select().where(batch_jobs_t.c.id == job_id)).mappings().first()
    if row is None:
        raise NotFound(f"No batch job {job_id!r}; GET /v1/batch/jobs lists them.")
    return BatchJobRecord(**row)


def _transition(c: Connection, job_id: str, expect: tuple[str, ...], status: str,
                **values: Any) -> bool:
    res = c.execute(batch_jobs_t.update()
                    .where(batch_jobs_t.c.id == job_id, batch_jobs_t.c.status.in_(expect))
                    .values(status=status, modified_at=time.time(), **values))
    return res.rowcount == 1


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
