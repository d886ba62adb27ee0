"""The release gate's keeper: evaluates the ``ft:`` model of each finished fine-tuning job that
carries an evaluation policy, against its base model, and releases it or holds it.

`souverain serve` builds one (cli layer) and hands it to the server, which starts it with the
app and stops it at shutdown (`souverain.server.evaluations.GateKeeper` is the protocol: the
server never imports this layer). It is a client of the API like any other: `ApiTarget`s on
the server it runs in, with a per-process key that only the server knows the digest of; the
server serves held models to that key (and to administrators) and to nobody else.

One thread: wait for the server's ``/health`` -> requeue the gates a stopped keeper left
``running`` -> loop: claim the oldest pending gate of a SUCCESS job on a model served here
(`GateRows.claim`, a conditional UPDATE) -> `run_eval(candidate, base, policy.suites,
SuiteOptions(limit=policy.limit), policy=policy)` -> the report (JSON + HTML) under
``DATA/evaluations/<run id>/`` -> the run recorded (`EvalRunStore`) -> passed | failed (the
verdict's reasons) | error (why the evaluation could not run), each with its job event. A
keeper stopped mid-evaluation leaves the gate ``running``; the next start runs it again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from souverain.finetune.eval_runs import EvalRunStore, evaluations_dir
from souverain.finetune.release_gate import ERROR, FAILED, PASSED, GateRows
from souverain.finetune.store import JobRecord, JobStore
from souverain.server.evaluations import report_url
from souverain.server.keyfile import key_digest

log = logging.getLogger("souverain.eval.gate")


class GateKeeper:
    """Runs the release gates of the jobs on ``models`` (None: every model) found in the jobs
    database ``db_url`` (None: the data folder's SQLite), evaluating through ``url``."""

    def __init__(self, url: str, *, db_url: str | None = None, data_dir: Path | None = None,
                 models: Sequence[str] | None = None, poll_s: float = 1.0,
                 concurrency: int = 8):
        self.url = url.rstrip("/")
        self.db_url, self.data_dir = db_url, data_dir
        self.models = list(models) if models is not None else None
        self.poll_s = poll_s
        self._token = secrets.token_urlsafe(32)
        self.token_digest = key_digest(self._token)
        self.owner = uuid.uuid4().hex
        self.concurrency = concurrency
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never the key
        return f"GateKeeper({self.url!r}, models={self.models!r})"

    # -- the server's side (souverain.server.evaluations.GateKeeper) ------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="release-gate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            store = JobStore(self.db_url, self.data_dir)
        except Exception:
            log.exception("release gate: cannot open the jobs database; no gate will run")
            return
        runs = EvalRunStore(store.url, engine=store.engine, root=self.data_dir)
        gates = GateRows(store)
        try:
            if not self._wait_ready():
                return
            requeued = gates.requeue_running(self.models)
            if requeued:
                log.info("release gate: %d interrupted evaluation(s) will run again", requeued)
            while not self._stop.is_set():
                try:
                    job = gates.claim(self.owner, self.models)
                except Exception:  # a busy database: try again
                    log.warning("release gate: claim failed", exc_info=True)
                    job = None
                if job is None:
                    self._stop.wait(self.poll_s)
                    continue
                self._gate(job, gates, runs)
        finally:
            store.close()

    def _wait_ready(self) -> bool:
        """Until the server answers ``/health`` (the lifespan starts us before it listens)."""
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            self._stop.wait(0.5)
        return False

    def _gate(self, job: JobRecord, gates: GateRows, runs: EvalRunStore) -> None:
        """Evaluate one claimed job and record the decision (see the module docstring)."""
        log.info("release gate: evaluating %s (job %s) against %s", job.fine_tuned_model,
                 job.id, job.model)
        started = time.monotonic()
        try:
            run = run_gate_eval(job, self.url, self._token, concurrency=self.concurrency)
            doc = run.to_json()
            doc.setdefault("meta", {})["release_gate"] = {"job_id": job.id}
            from souverain.eval.report import write_report

            _json_path, html_path = write_report(run, evaluations_dir(self.data_dir) / run.id)
            html = html_path.read_text(encoding="utf-8")
            runs.add(doc, html, source="gate", job_id=job.id)
        except Exception as exc:
            if self._stop.is_set():  # the server is stopping: run it again at the next start
                log.info("release gate: %s interrupted by shutdown", job.id)
                return
            reason = str(getattr(exc, "message", None) or exc) or type(exc).__name__
            log.warning("release gate: evaluation of %s failed: %s", job.id, reason)
            gates.finish(job.id, self.owner, ERROR,
                         [f"the evaluation could not run: {reason}"], None)
            return
        verdict = run.verdict or {}
        passed = bool(verdict.get("passed"))
        checks = [c.get("text", "") for c in verdict.get("checks") or []]
        reasons = list(verdict.get("reasons") or []) if not passed else checks
        gates.finish(job.id, self.owner, PASSED if passed else FAILED, reasons, run.id, {
            "report_url": report_url(run.id), "suites": list(run.suites),
            "duration_s": round(time.monotonic() - started, 1)})
        log.info("release gate: %s %s", job.fine_tuned_model,
                 "passed" if passed else "failed: " + "; ".join(reasons))


def run_gate_eval(job: JobRecord, url: str, token: str, *, concurrency: int = 8) -> Any:
    """The job's policy run on its ``ft:`` model against its base, through ``url``, with
    ``concurrency`` requests in flight (the server batches them)."""
    from souverain.eval.policy import Policy
    from souverain.eval.runner import run_eval
    from souverain.eval.suite import SuiteOptions
    from souverain.eval.target import ApiTarget

    policy = Policy.parse(job.evaluation, where=f"job {job.id}'s evaluation policy")
    candidate = ApiTarget(url, str(job.fine_tuned_model), token)
    base = ApiTarget(url, job.model, token)
    options = SuiteOptions(limit=policy.limit, concurrency=concurrency)
    return run_eval(candidate, base, list(policy.suites), options, policy=policy)
