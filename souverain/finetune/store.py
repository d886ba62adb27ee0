"""Persistent fine-tuning state: uploaded files, jobs, their events and checkpoints.

One SQL database (SQLAlchemy Core: ``sqlite:///path`` by default, ``postgresql+psycopg://...``
for a shared server; its tables and engine are jobs_db.py's) holds the metadata; file bytes
live under ``DATA/finetune/files/`` (written atomically: temp file, fsync, rename) and training
runs under ``DATA/finetune/runs/<job id>/``.

The HTTP server and the worker process both open a `JobStore` on the same database. Every state
change is one conditional ``UPDATE ... WHERE status IN (...)``, so two processes never both win
a transition (two workers never claim the same job; a cancel never overwrites a SUCCESS).

Statuses (La Plateforme's): QUEUED -> STARTED (claimed by a worker) -> VALIDATING ->
VALIDATED -> RUNNING -> SUCCESS | FAILED; VALIDATING -> FAILED_VALIDATION; a job created with
``auto_start=false`` stops at VALIDATED until started (-> QUEUED again). Cancel: QUEUED or
VALIDATED -> CANCELLED at once; a job a worker holds -> CANCELLATION_REQUESTED -> CANCELLED.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from souverain.errors import SouverainError
from souverain.finetune.jobs_db import (
    READ,
    checkpoints_t,
    events_t,
    files_t,
    jobs_t,
    metadata,
    open_engine,
    safe_url,
)
from souverain.paths import OwnerLock, data_home
from souverain.sqldb import add_missing_columns, create_schema

QUEUED, STARTED, VALIDATING, VALIDATED, RUNNING = (
    "QUEUED", "STARTED", "VALIDATING", "VALIDATED", "RUNNING")
FAILED_VALIDATION, FAILED, SUCCESS, CANCELLED, CANCELLATION_REQUESTED = (
    "FAILED_VALIDATION", "FAILED", "SUCCESS", "CANCELLED", "CANCELLATION_REQUESTED")
STATUSES = (QUEUED, STARTED, VALIDATING, VALIDATED, RUNNING, FAILED_VALIDATION, FAILED,
            SUCCESS, CANCELLED, CANCELLATION_REQUESTED)
TERMINAL = (FAILED_VALIDATION, FAILED, SUCCESS, CANCELLED)
HELD = (STARTED, VALIDATING, RUNNING, CANCELLATION_REQUESTED)  # a worker owns the job
PURPOSES = ("fine-tune", "batch")


class JobsError(SouverainError):
    """A files / fine-tuning jobs request cannot be done (the message says why and the fix)."""


class NotFound(JobsError):
    """No file or job with that id."""


class Conflict(JobsError):
    """The job or file is not in a state that allows the operation."""


class Busy(JobsError):
    """Another process held the database's write lock for longer than the busy timeout: try
    again in a moment (HTTP 503 with Retry-After)."""


def finetune_dir(root: Path | None = None) -> Path:
    return (root or data_home()) / "finetune"


def default_db_url(root: Path | None = None) -> str:
    return f"sqlite:///{finetune_dir(root) / 'jobs.sqlite'}"


def this_host() -> str:
    return socket.gethostname()


@dataclass
class FileRecord:
    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: float
    sha256: str
    sample_type: str | None
    num_lines: int | None
    mimetype: str | None
    path: str


@dataclass
class JobRecord:
    id: str
    model: str
    model_path: str
    status: str
    auto_start: bool
    hyperparameters: dict[str, Any]
    training_files: list[dict[str, Any]]
    validation_files: list[str]
    suffix: str | None
    fine_tuned_model: str | None
    created_at: float
    modified_at: float
    trained_tokens: int | None
    run_dir: str | None
    adapter_dir: str | None
    error: str | None
    worker_pid: int | None
    worker_host: str | None
    heartbeat_at: float | None
    resumes: int = 0
    worker_token: str | None = None
    job_type: str | None = None  # None (= "completion") or "classifier"
    classifier_targets: list[dict[str, Any]] | None = None
    # the release gate (`souverain.finetune.release_gate`): policy, status, reasons, run
    evaluation: dict[str, Any] | None = None
    evaluation_status: str | None = None
    evaluation_reasons: list[str] | None = None
    evaluation_run_id: str | None = None
    evaluation_owner: str | None = None

    @property
    def is_classifier(self) -> bool:
        return self.job_type == "classifier"

    @property
    def training_file_ids(self) -> list[str]:
        return [f["file_id"] for f in self.training_files]


@dataclass
class EventRecord:
    job_id: str
    created_at: float
    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointRecord:
    job_id: str
    step: int
    path: str
    metrics: dict[str, Any]
    created_at: float


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<suffix>:<first 8 of the job id>`` (``ft:<base>:<id8>`` without a suffix)."""
    return ":".join(["ft", base, *([suffix] if suffix else []), job_id[:8]])


class Transactions:
    """Short transactions on ``self.engine``, shared by every table of the jobs database (jobs,
    batch jobs, model lifecycle, evaluation runs, release gates): ``write()`` is one write
    transaction (SQLite: BEGIN IMMEDIATE), ``read()`` a read-only one (SQLite: a deferred
    BEGIN, which a writer never blocks). SQLite's lock held past the busy timeout -> `Busy`."""

    engine: Engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with _busy_as_error(), self.engine.begin() as c:
            yield c

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with _busy_as_error(), self.engine.connect() as conn:
            conn.execution_options(**{READ: True})
            with conn.begin():
                yield conn


class JobStore(Transactions):
    """Files, jobs, events and checkpoints in one SQL database (see the module docstring)."""

    def __init__(self, url: str | None = None, root: Path | None = None, *,
                 busy_timeout_s: float = 30.0):
        self.root = finetune_dir(root)
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        self.workers_dir = self.root / "workers"
        self.url = url or default_db_url(root)
        try:
            self.engine = open_engine(self.url, busy_timeout_s)
            create_schema(self.engine, metadata,
                          migrate=lambda conn: add_missing_columns(conn, [jobs_t]))
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            raise _open_error(self.url, exc) from None

    def close(self) -> None:
        self.engine.dispose()

    # -- files ------------------------------------------------------------------------------
    def add_file(self, data: bytes, filename: str, purpose: str, *,
                 sample_type: str | None = None, num_lines: int | None = None,
                 mimetype: str | None = None) -> FileRecord:
        """Store ``data`` (atomically, under files/) and its row; returns the record."""
        if purpose not in PURPOSES:
            raise JobsError(f"purpose {purpose!r} is not supported here; use one of "
                            f"{', '.join(PURPOSES)}.")
        file_id = str(uuid.uuid4())
        path = self.files_dir / f"{file_id}.jsonl"
        write_atomic(path, data)
        rec = FileRecord(id=file_id, filename=filename, bytes=len(data), purpose=purpose,
                         created_at=time.time(), sha256=hashlib.sha256(data).hexdigest(),
                         sample_type=sample_type, num_lines=num_lines, mimetype=mimetype,
                         path=str(path))
        try:
            with self.write() as c:
                c.execute(files_t.insert().values(**rec.__dict__))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return rec

    def get_file(self, file_id: str) -> FileRecord:
        row = None
        if "\x00" not in file_id:  # (PostgreSQL refuses NUL in text; no id holds one)
            with self.read() as c:
                row = c.execute(files_t.select().where(files_t.c.id == file_id)
                                ).mappings().first()
        if row is None:
            raise NotFound(f"No file {file_id!r}; GET /v1/files lists the uploaded files.")
        return FileRecord(**row)

    def list_files(self, *, purpose: str | None = None, search: str | None = None,
                   sample_types: Iterable[str] | None = None, offset: int = 0,
                   limit: int = 100) -> tuple[list[FileRecord], int]:
        cond = []
        if purpose:
            cond.append(files_t.c.purpose == purpose)
        if search:
            cond.append(files_t.c.filename.contains(search, autoescape=True))
        if sample_types:
            cond.append(files_t.c.sample_type.in_(list(sample_types)))
        where = sa.and_(sa.true(), *cond)
        with self.read() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(files_t).where(where)
                              ).scalar_one()
            rows = c.execute(files_t.select().where(where)
                             .order_by(files_t.c.created_at.desc(), files_t.c.id)
                             .offset(offset).limit(limit)).mappings().all()
        return [FileRecord(**r) for r in rows], int(total)

    def delete_file(self, file_id: str) -> FileRecord:
        """Delete a file, its row and its bytes, unless a job that has not finished still needs
        it; returns what was deleted."""
        rec = self.get_file(file_id)
        with self.write() as c:
            for job in c.execute(jobs_t.select().where(jobs_t.c.status.notin_(TERMINAL))
                                 ).mappings():
                ids = [f["file_id"] for f in job["training_files"]] + list(
                    job["validation_files"])
                if file_id in ids:
                    raise Conflict(f"File {file_id} is used by job {job['id']} "
                                   f"({job['status']}); cancel the job or wait for it to "
                                   "finish before deleting the file.")
            c.execute(files_t.delete().where(files_t.c.id == file_id))
        Path(rec.path).unlink(missing_ok=True)
        return rec

    # -- jobs -------------------------------------------------------------------------------
    def create_job(self, *, model: str, model_path: str, training_files: list[dict[str, Any]],
                   validation_files: list[str] | None = None,
                   hyperparameters: dict[str, Any] | None = None, suffix: str | None = None,
                   auto_start: bool = True, job_type: str | None = None,
                   classifier_targets: list[dict[str, Any]] | None = None,
                   evaluation: dict[str, Any] | None = None) -> JobRecord:
        """A new QUEUED job; every file must exist (NotFound otherwise) and be for fine-tune.
        With an ``evaluation`` policy its model is held after training until the release
        gate passes (its gate ``pending`` from now)."""
        validation_files = list(validation_files or [])
        for fid in [f["file_id"] for f in training_files] + validation_files:
            f = self.get_file(fid)
            if f.purpose != "fine-tune":
                raise JobsError(f"File {fid} was uploaded with purpose {f.purpose!r}; "
                                "training and validation files need purpose 'fine-tune'.")
        now = time.time()
        job_id = str(uuid.uuid4())
        values: dict[str, Any] = {
            "id": job_id, "model": model, "model_path": model_path, "status": QUEUED,
            "auto_start": auto_start, "hyperparameters": dict(hyperparameters or {}),
            "training_files": list(training_files), "validation_files": validation_files,
            "suffix": suffix, "fine_tuned_model": None, "created_at": now, "modified_at": now,
            "trained_tokens": None, "run_dir": str(self.runs_dir / job_id),
            "adapter_dir": None, "error": None, "worker_pid": None, "worker_host": None,
            "heartbeat_at": None, "resumes": 0, "worker_token": None,
            "job_type": job_type, "classifier_targets": classifier_targets,
            "evaluation": evaluation, "evaluation_status": "pending" if evaluation else None,
            "evaluation_reasons": None, "evaluation_run_id": None, "evaluation_owner": None}
        with self.write() as c:
            c.execute(jobs_t.insert().values(**values))
            _event(c, job_id, "status-updated", {"status": QUEUED})
        return JobRecord(**values)

    def get_job(self, job_id: str) -> JobRecord:
        with self.read() as c:
            return _job(c, job_id)

    def list_jobs(self, *, model: str | None = None, status: str | None = None,
                  suffix: str | None = None, created_after: float | None = None,
                  offset: int = 0, limit: int = 100) -> tuple[list[JobRecord], int]:
        cond = []
        if model:
            cond.append(jobs_t.c.model == model)
        if status:
            cond.append(jobs_t.c.status == status)
        if suffix:
            cond.append(jobs_t.c.suffix == suffix)
        if created_after is not None:
            cond.append(jobs_t.c.created_at > created_after)
        where = sa.and_(sa.true(), *cond)
        with self.read() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(jobs_t).where(where)
                              ).scalar_one()
            rows = c.execute(jobs_t.select().where(where)
                             .order_by(jobs_t.c.created_at.desc(), jobs_t.c.id)
                             .offset(offset).limit(limit)).mappings().all()
        return [JobRecord(**r) for r in rows], int(total)

    def events(self, job_id: str) -> list[EventRecord]:
        with self.read() as c:
            rows = c.execute(events_t.select().where(events_t.c.job_id == job_id)
                             .order_by(events_t.c.id)).mappings().all()
        return [EventRecord(r["job_id"], r["created_at"], r["name"], r["data"] or {})
                for r in rows]

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        with self.read() as c:
            rows = c.execute(checkpoints_t.select().where(checkpoints_t.c.job_id == job_id)
                             .order_by(checkpoints_t.c.step, checkpoints_t.c.id)
                             ).mappings().all()
        return [CheckpointRecord(r["job_id"], r["step"], r["path"], r["metrics"] or {},
                                 r["created_at"]) for r in rows]

    def cancel(self, job_id: str) -> JobRecord:
        """A job nobody holds is CANCELLED at once; a held one gets CANCELLATION_REQUESTED (its
        worker stops at the next step). Cancelling a cancelled job is a no-op."""
        with self.write() as c:
            job = _job(c, job_id)
            done = _transition(c, job_id, (QUEUED, VALIDATED), CANCELLED, worker_pid=None,
                               worker_host=None) \
                or _transition(c, job_id, (STARTED, VALIDATING, RUNNING), CANCELLATION_REQUESTED)
            if not done and job.status not in (CANCELLED, CANCELLATION_REQUESTED):
                raise Conflict(f"Job {job_id} already ended ({job.status}); there is nothing "
                               "to cancel.")
            return _job(c, job_id)

    def start(self, job_id: str) -> JobRecord:
        """Start a job created with ``auto_start=false``: a VALIDATED one is queued again (the
        worker re-checks its files, then trains); one not validated yet trains right after."""
        with self.write() as c:
            job = _job(c, job_id)
            if not _transition(c, job_id, (VALIDATED,), QUEUED, auto_start=True):
                if job.status in TERMINAL or job.status == CANCELLATION_REQUESTED:
                    raise Conflict(f"Job {job_id} already ended ({job.status}); create a new "
                                   "job to train again.")
                if job.auto_start:
                    raise Conflict(f"Job {job_id} is already started ({job.status}).")
                c.execute(jobs_t.update().where(jobs_t.c.id == job_id)
                          .values(auto_start=True, modified_at=time.time()))
            return _job(c, job_id)

    # -- the worker's side ------------------------------------------------------------------
    def claim_next(self, pid: int, host: str | None = None, token: str | None = None,
                   models: Iterable[str] | None = None) -> JobRecord | None:
        """Atomically take the oldest QUEUED job (-> STARTED, owned by ``host:pid``, and by
        the worker whose `WorkerLock` is ``token``); with ``models``, only a job for one of
        these base models (the ones its server serves: the others wait for their server)."""
        host = host or this_host()
        where = _for_models(jobs_t.c.status == QUEUED, models)
        while True:
            with self.write() as c:
                job_id = c.execute(sa.select(jobs_t.c.id).where(where)
                                   .order_by(jobs_t.c.created_at, jobs_t.c.id).limit(1)
                                   ).scalar()
                if job_id is None:
                    return None
                if _transition(c, job_id, (QUEUED,), STARTED, worker_pid=pid,
                               worker_host=host, worker_token=token,
                               heartbeat_at=time.time()):
                    return _job(c, job_id)
            # another worker took it between the select and the update: try the next one

    def set_status(self, job_id: str, status: str, *, expect: Iterable[str] = HELD,
                   event: dict[str, Any] | None = None, **values: Any) -> bool:
        """``status`` (+ ``values``) if the job is in one of ``expect``; True if it was."""
        with self.write() as c:
            ok = _transition(c, job_id, tuple(expect), status, **values)
            if ok and event is not None:
                _event(c, job_id, "status-updated", {"status": status, **event})
            return ok

    def update(self, job_id: str, **values: Any) -> None:
        with self.write() as c:
            c.execute(jobs_t.update().where(jobs_t.c.id == job_id)
                      .values(modified_at=time.time(), **values))

    def heartbeat(self, job_id: str) -> str:
        """Mark the job alive now; returns its current status (cancellation shows up here)."""
        with self.write() as c:
            c.execute(jobs_t.update().where(jobs_t.c.id == job_id)
                      .values(heartbeat_at=time.time()))
            return str(c.execute(sa.select(jobs_t.c.status).where(jobs_t.c.id == job_id)
                                 ).scalar_one())

    def add_event(self, job_id: str, name: str, data: dict[str, Any] | None = None) -> None:
        with self.write() as c:
            _event(c, job_id, name, data or {})

    def add_checkpoint(self, job_id: str, step: int, path: str,
                       metrics: dict[str, Any]) -> None:
        with self.write() as c:
            # a resumed run may write a step again: keep one row per step
            c.execute(checkpoints_t.delete().where(checkpoints_t.c.job_id == job_id,
                                                   checkpoints_t.c.step == step))
            c.execute(checkpoints_t.insert().values(job_id=job_id, step=step, path=path,
                                                    metrics=metrics, created_at=time.time()))
            _event(c, job_id, "checkpoint", {"step": step, **metrics})

    def orphans(self, *, stale_after: float, host: str | None = None,
                pid_alive: Callable[[int], bool] | None = None,
                models: Iterable[str] | None = None) -> list[JobRecord]:
        """Jobs a worker holds whose worker is gone: it released the job (stopped while
        training); its `WorkerLock` under this data folder is free (the process ended: a
        crash, kill -9, a reboot, a new container; pid reuse cannot fool it); without a lock
        file, its pid is dead on this host; or its heartbeat is older than ``stale_after``.
        With ``models``, only jobs for these base models."""
        host = host or this_host()
        alive = pid_alive or _pid_alive
        now = time.time()
        with self.read() as c:
            rows = c.execute(jobs_t.select().where(_for_models(jobs_t.c.status.in_(HELD),
                                                               models))
                             .order_by(jobs_t.c.created_at)).mappings().all()
        out = []
        for r in rows:
            job = JobRecord(**r)
            locked = WorkerLock.held(self.workers_dir, job.worker_token)
            if job.worker_pid is None or locked is False \
                    or (locked is None and job.worker_host == host
                        and not alive(job.worker_pid)) \
                    or now - (job.heartbeat_at or 0) > stale_after:
                out.append(job)
        return out

    def adopt(self, job: JobRecord, pid: int, host: str | None = None,
              token: str | None = None) -> bool:
        """Take over an orphaned job, if nobody did first (compare-and-set on its owner)."""
        owner = sa.and_(jobs_t.c.worker_pid == job.worker_pid,
                        jobs_t.c.worker_host == job.worker_host) \
            if job.worker_pid is not None else jobs_t.c.worker_pid.is_(None)
        with self.write() as c:
            res = c.execute(jobs_t.update()
                            .where(jobs_t.c.id == job.id, jobs_t.c.status == job.status, owner)
                            .values(worker_pid=pid, worker_host=host or this_host(),
                                    worker_token=token, heartbeat_at=time.time(),
                                    modified_at=time.time()))
            return res.rowcount == 1

    def succeeded_models(self) -> list[tuple[str, str, str, str]]:
        """``(fine_tuned_model, base_model, adapter_dir, job_id)`` of every SUCCESS job, oldest
        first; ``base_model`` is the served model name the job was created with."""
        with self.read() as c:
            rows = c.execute(sa.select(jobs_t.c.fine_tuned_model, jobs_t.c.model,
                                       jobs_t.c.adapter_dir, jobs_t.c.id)
                             .where(jobs_t.c.status == SUCCESS)
                             .where(_not_classifier())
                             .order_by(jobs_t.c.created_at)).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows if r[0] and r[2]]

    def succeeded_classifiers(self) -> dict[str, JobRecord]:
        """The classifier models of every SUCCESS classifier job, by ``fine_tuned_model``."""
        with self.read() as c:
            rows = c.execute(jobs_t.select().where(jobs_t.c.status == SUCCESS)
                             .where(jobs_t.c.job_type == "classifier")
                             .order_by(jobs_t.c.created_at)).mappings().all()
        jobs = [JobRecord(**r) for r in rows]
        return {j.fine_tuned_model: j for j in jobs if j.fine_tuned_model and j.adapter_dir}


# a worker process's liveness: an flock on ``workers/<token>.lock`` held for its life (the
# kernel drops it however the process ends; see `souverain.paths.OwnerLock`)
WorkerLock = OwnerLock


@contextmanager
def _busy_as_error() -> Iterator[None]:
    """SQLite's "database is locked" after the busy timeout -> `Busy` (the others re-raise)."""
    try:
        yield
    except sa.exc.OperationalError as exc:
        if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
            raise
        raise Busy("The jobs database is busy (another process holds its write lock); "
                   "try again in a few seconds.") from None


def _not_classifier() -> Any:
    """Jobs that made LoRA adapters of a served LLM (completion jobs, old rows included)."""
    return sa.or_(jobs_t.c.job_type.is_(None), jobs_t.c.job_type != "classifier")


def _for_models(cond: Any, models: Iterable[str] | None) -> Any:
    """``cond``, and the job's base model among ``models`` when given (None: any model)."""
    return cond if models is None else sa.and_(cond, jobs_t.c.model.in_(list(models)))


def _job(c: Connection, job_id: str) -> JobRecord:
    row = None if "\x00" in job_id else \
        c.execute(jobs_t.select().where(jobs_t.c.id == job_id)).mappings().first()
    if row is None:
        raise NotFound(f"No fine-tuning job {job_id!r}; GET /v1/fine_tuning/jobs lists them.")
    return JobRecord(**row)


def _transition(c: Connection, job_id: str, expect: tuple[str, ...], status: str,
                **values: Any) -> bool:
    if "worker_pid" in values and values["worker_pid"] is None:
        values.setdefault("worker_token", None)  # released: no owner at all
    res = c.execute(jobs_t.update()
                    .where(jobs_t.c.id == job_id, jobs_t.c.status.in_(expect))
                    .values(status=status, modified_at=time.time(), **values))
    if res.rowcount == 1 and status in (CANCELLED, CANCELLATION_REQUESTED, QUEUED):
        # the worker's transitions record their own (richer) events
        _event(c, job_id, "status-updated", {"status": status})
    return res.rowcount == 1


def _event(c: Connection, job_id: str, name: str, data: dict[str, Any]) -> None:
    c.execute(events_t.insert().values(job_id=job_id, created_at=time.time(), name=name,
                                       data=data))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (dead, not yet reaped by its parent) is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """``data`` at ``path`` whole or not at all (a temporary file, fsync'd, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_error(url: str, exc: BaseException) -> JobsError:
    if isinstance(exc, (sa.exc.ArgumentError, ImportError)) and not url.startswith("sqlite"):
        # a bad URL or a missing driver
        return JobsError(f"Cannot open the jobs database {safe_url(url)} ({exc}); use "
                         "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.")
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return JobsError(f"Cannot open the fine-tuning jobs database {safe_url(url)}: "
                     f"{reason}; pass another --jobs-db, or --no-finetune.")
