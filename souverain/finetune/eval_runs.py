"""Evaluation runs, durable and shared: one ``eval_runs`` row per `souverain eval` run (the
EvalRun JSON of `souverain.eval.runner`, kept as sent) in the jobs database (jobs_db.py's
table; SQLite or PostgreSQL), or in DATA/lifecycle.db for a server run with --no-finetune;
the rendered HTML report beside the data folder's other files, under
``DATA/evaluations/<run id>/report.html`` (written atomically).

Two writers: the release gate (``source`` gate: the run that decided a fine-tuning job) and
``POST /v1/observability/evaluation-runs_v2`` (``source`` upload: `souverain eval run
--upload`). A run id is written once: recording it again is a `Conflict`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from souverain.finetune.jobs_db import eval_runs_t, open_engine, safe_url
from souverain.finetune.lifecycle import lifecycle_db_url
from souverain.finetune.store import Conflict, JobsError, NotFound, Transactions, write_atomic
from souverain.paths import data_home
from souverain.sqldb import create_schema

RUN_ID = re.compile(r"^evr_[0-9a-f]{24}$")


@dataclass(frozen=True)
class RunRecord:
    """One stored evaluation run (``run``: the EvalRun JSON as recorded)."""

    id: str
    model: str
    base_model: str | None
    created_at: float
    recorded_at: float
    passed: bool | None
    suites: list[str]
    source: str
    job_id: str | None
    created_by: str | None
    run: dict[str, Any]
    html_path: str | None

    @property
    def has_report(self) -> bool:
        return self.html_path is not None and Path(self.html_path).is_file()


def evaluations_dir(root: Path | None = None) -> Path:
    return (root or data_home()) / "evaluations"


class EvalRunStore(Transactions):
    """The ``eval_runs`` rows (on the jobs database's engine when given) and the HTML files."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None,
                 root: Path | None = None):
        self.url = url or lifecycle_db_url(root)
        self.dir = evaluations_dir(root)
        self._own_engine = engine is None
        try:
            self.engine = engine or open_engine(self.url)
            create_schema(self.engine, eval_runs_t.metadata, tables=[eval_runs_t])
        except (sa.exc.SQLAlchemyError, OSError, ImportError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise JobsError(f"Cannot open the evaluation runs' database {safe_url(self.url)}: "
                            f"{reason}; check --data-dir / --jobs-db.") from None

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    def add(self, run: dict[str, Any], html: str | None, *, source: str,
            job_id: str | None = None, created_by: str | None = None) -> RunRecord:
        """Record ``run`` (an EvalRun's JSON, already checked by the caller) and its HTML."""
        run_id = str(run["id"])
        if not RUN_ID.match(run_id):
            raise JobsError(f"run id {run_id!r} is not an evaluation run id (evr_ + 24 hex).")
        if self._exists(run_id):  # (before writing: the recorded run's report stays as it is)
            raise _recorded(run_id)
        html_path = None
        if html is not None:
            path = self.dir / run_id / "report.html"
            write_atomic(path, html.encode("utf-8"), mode=0o600)
            html_path = str(path)
        verdict = run.get("verdict") or None
        rec = RunRecord(
            id=run_id, model=str(run["candidate"]["model"]),
            base_model=(run.get("base") or {}).get("model"),
            created_at=float(run.get("created_at") or time.time()), recorded_at=time.time(),
            passed=bool(verdict["passed"]) if verdict else None,
            suites=sorted(run.get("suites", {})), source=source, job_id=job_id,
            created_by=created_by, run=run, html_path=html_path)
        try:
            with self.write() as c:
                if c.execute(sa.select(eval_runs_t.c.id).where(eval_runs_t.c.id == run_id)
                             ).first() is not None:
                    raise _recorded(run_id)
                c.execute(eval_runs_t.insert().values(**rec.__dict__))
        except Conflict:
            raise
        except BaseException:
            if html_path is not None and not self._exists(run_id):
                Path(html_path).unlink(missing_ok=True)
            raise
        return rec

    def _exists(self, run_id: str) -> bool:
        with self.read() as c:
            return c.execute(sa.select(eval_runs_t.c.id).where(eval_runs_t.c.id == run_id)
                             ).first() is not None

    def get(self, run_id: str) -> RunRecord:
        row = None
        if RUN_ID.match(run_id):
            with self.read() as c:
                row = c.execute(eval_runs_t.select().where(eval_runs_t.c.id == run_id)
                                ).mappings().first()
        if row is None:
            raise NotFound(f"No evaluation run {run_id!r}; POST "
                           "/v1/observability/evaluation-runs_v2/search lists them.")
        return RunRecord(**row)

    def search(self, *, model_filters: list[tuple[str, str]] | None = None,
               all_models: bool = False, run_ids: list[str] | None = None,
               suites: list[str] | None = None, any_suite: bool = False,
               offset: int = 0, limit: int = 50) -> tuple[list[RunRecord], int]:
        """Runs newest first: whose candidate model matches ``model_filters`` (``(equals |
        contains, value)``: any of them, or all with ``all_models``), among ``run_ids``, that
        ran every suite of ``suites`` (any of them with ``any_suite``)."""
        cond: list[Any] = []
        if model_filters:
            each = [eval_runs_t.c.model == v if op == "equals"
                    else eval_runs_t.c.model.contains(v, autoescape=True)
                    for op, v in model_filters if "\x00" not in v]
            if len(each) < len(model_filters) and all_models:
                return [], 0  # (no model id holds a NUL; PostgreSQL refuses one in text)
            cond.append(sa.and_(*each) if all_models else sa.or_(sa.false(), *each))
        if run_ids is not None:
            cond.append(eval_runs_t.c.id.in_([r for r in run_ids if RUN_ID.match(r)]))
        where = sa.and_(sa.true(), *cond)
        with self.read() as c:
            rows = c.execute(eval_runs_t.select().where(where)
                             .order_by(eval_runs_t.c.created_at.desc(), eval_runs_t.c.id)
                             ).mappings().all()
        found = [RunRecord(**r) for r in rows]
        if suites:  # (a JSON list: filtered here, the same on SQLite and PostgreSQL)
            want = set(suites)
            found = [r for r in found
                     if (want & set(r.suites) if any_suite else want <= set(r.suites))]
        return found[offset:offset + limit], len(found)

    def latest(self) -> dict[str, tuple[str, float, bool | None]]:
        """The newest run of each candidate model (what its card links): model ->
        ``(run id, created_at, passed)``."""
        with self.read() as c:
            rows = c.execute(sa.select(eval_runs_t.c.model, eval_runs_t.c.id,
                                       eval_runs_t.c.created_at, eval_runs_t.c.passed)
                             .order_by(eval_runs_t.c.created_at, eval_runs_t.c.id)).all()
        return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}


def _recorded(run_id: str) -> Conflict:
    return Conflict(f"Evaluation run {run_id} is already recorded; a run is recorded once (run "
                    "the evaluation again for a new id).")
