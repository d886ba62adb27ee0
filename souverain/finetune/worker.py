"""The fine-tuning worker: a separate OS process that runs the jobs of a `JobStore`.

    python -m souverain.finetune.worker --db sqlite:///DATA/finetune/jobs.sqlite --data-dir DATA

`souverain serve` starts one (unless ``--no-finetune``) and stops it with itself, so training
never competes with the event loop that serves requests, and uses few threads (1 by default)
when it shares the machine with serving.

One job at a time: claim the oldest QUEUED job (atomic) for a model its server serves
(``--model NAME``, repeatable; a job for another model waits QUEUED for a server that serves
it, when several servers share one ``--jobs-db``), VALIDATING (``validate_file`` on every
file; errors -> FAILED_VALIDATION naming file and line), VALIDATED (stop here when the job was
created with ``auto_start=false``), RUNNING (``run_training``: events, checkpoint rows and a
heartbeat go to the store; a cancel request stops it at the next step), then SUCCESS (with
``fine_tuned_model`` and the final adapter folder) | CANCELLED | FAILED (the exception's
message).

Nothing is lost to a crash or a restart: the worker looks for jobs whose worker is gone at
start (so a restarted server resumes an interrupted job within seconds, with no request) and
between jobs. Each worker holds a `WorkerLock` (an flock under DATA/finetune/workers/) for its
life, so a job's worker is known dead as soon as its process is, even when its pid was reused
(a restarted container, a reboot); without a lock file, its pid dead on this host, or its
heartbeat older than ``--stale-after``, says so. A job caught while validating is queued again; one caught RUNNING is resumed from its
last checkpoint (``run_training(resume=True)``) or trained again from the start when it had
none; after ``--max-resumes`` unclean stops it is marked FAILED with the reason. A worker asked
to stop (SIGTERM, or its parent server gone) stops training at the next step and leaves the job
RUNNING without an owner, for the next worker to resume at once. Validation and training poll
the stop and cancel flags between lines, batches and microbatches, so either takes effect
within seconds, even on a big file or a long step.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from souverain.finetune.job_training import (
    Hold,
    Progress,
    classifier_train_config,
    last_step,
    method_of,
    train_config,
)
from souverain.finetune.jobs_db import safe_url
from souverain.finetune.store import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    FAILED,
    FAILED_VALIDATION,
    QUEUED,
    RUNNING,
    STARTED,
    SUCCESS,
    VALIDATED,
    VALIDATING,
    JobRecord,
    JobStore,
    NotFound,
    WorkerLock,
    fine_tuned_name,
    this_host,
)

if TYPE_CHECKING:
    from souverain.tokenizer import Tokenizer

log = logging.getLogger("souverain.finetune.worker")

_MAX_LISTED_ERRORS = 20


@dataclass
class WorkerConfig:
    threads: int | None = 1  # torch threads for training (None: all cores)
    poll_s: float = 1.0  # how often an idle worker looks for queued jobs
    heartbeat_s: float = 1.0
    stale_after_s: float = 60.0  # a held job without a heartbeat for this long is orphaned
    max_resumes: int = 3  # unclean stops (crash, kill) of one job before it is FAILED
    parent_pid: int | None = None  # stop when this process is gone (the server)
    step_event_every_s: float = 2.0  # training-step events stored at most this often
    # the base models (served names) whose jobs this worker takes; None: any job. A server's
    # worker takes only jobs for the models that server serves
    models: tuple[str, ...] | None = None


class Worker:
    """Runs jobs from ``store`` one at a time. ``trainer``, ``validator`` and
    ``load_tokenizer`` default to souverain's (`run_training`, `validate_file`, the base model's
    tokenizer); tests may pass their own."""

    def __init__(self, store: JobStore, config: WorkerConfig | None = None, *,
                 trainer: Callable[..., Any] | None = None,
                 validator: Callable[..., Any] | None = None,
                 load_tokenizer: Callable[[str], Tokenizer] | None = None):
        self.store = store
        self.config = config or WorkerConfig()
        self.pid = os.getpid()
        self.host = this_host()
        self.lock = WorkerLock(store.workers_dir)
        self.token = self.lock.token
        self.stopping = threading.Event()
        self._trainer = trainer
        self._validator = validator
        self._load_tokenizer = load_tokenizer or _tokenizer_of

    # -- the loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        """Work until `stop` (or the parent process is gone)."""
        if self.config.parent_pid is not None:
            threading.Thread(target=self._watch_parent, name="souverain-ft-parent",
                             daemon=True).start()
        models = self.config.models
        log.info("fine-tuning worker %s:%d ready (threads=%s, database %s, jobs for %s)",
                 self.host, self.pid, self.config.threads, safe_url(self.store.url),
                 ", ".join(models) if models is not None else "any model")
        while not self.stopping.is_set():
            try:
                if not self.run_once():
                    self.stopping.wait(self.config.poll_s)
            except Exception:  # e.g. the database briefly unreachable: retry
                log.exception("fine-tuning worker loop failed; retrying")
                self.stopping.wait(max(self.config.poll_s, 2.0))
        self.lock.release()
        log.info("fine-tuning worker %d stopped", self.pid)

    def run_once(self) -> bool:
        """Recover orphaned jobs, then run the next queued one; False when there was nothing."""
        did = self.recover()
        if self.stopping.is_set():
            return did
        job = self.store.claim_next(self.pid, self.host, self.token, self.config.models)
        if job is None:
            return did
        self.process(job)
        return True

    def _watch_parent(self) -> None:
        while not self.stopping.wait(0.5):
            if os.getppid() != self.config.parent_pid:
                log.warning("the server (pid %s) is gone; the worker stops",
                            self.config.parent_pid)
                self.stop()

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> bool:
        """Adopt every job whose worker is gone: requeue, cancel, resume or fail it."""
        did = False
        for job in self.store.orphans(stale_after=self.config.stale_after_s, host=self.host,
                                      models=self.config.models):
            if self.stopping.is_set():
                break
            if self._mine(job):
                continue
            if not self.store.adopt(job, self.pid, self.host, self.token):
                continue  # another worker got there first
            did = True
            unclean = job.worker_pid is not None
            if unclean:
                self.store.add_event(job.id, "worker-lost", {
                    "status": job.status, "worker": f"{job.worker_host}:{job.worker_pid}"})
                log.warning("job %s: its worker %s:%s is gone (%s)", job.id, job.worker_host,
                            job.worker_pid, job.status)
            if job.status in (STARTED, VALIDATING):
                self.store.set_status(job.id, QUEUED, expect=(job.status,), worker_pid=None,
                                      worker_host=None)
            elif job.status == CANCELLATION_REQUESTED:
                self.store.set_status(job.id, CANCELLED, expect=(CANCELLATION_REQUESTED,),
                                      event={}, worker_pid=None, worker_host=None)
            elif job.status == RUNNING:
                resumes = job.resumes + (1 if unclean else 0)
                if resumes > self.config.max_resumes:
                    self._finish(job, FAILED, error=(
                        f"The fine-tuning worker stopped {resumes} times while training this "
                        "job (killed, or out of memory?); giving up. Check the server log, "
                        "lower seq_len or lora_rank, and create a new job."))
                    continue
                self.store.update(job.id, resumes=resumes)
                self.train(self.store.get_job(job.id), recovering=True)
        return did

    def _mine(self, job: JobRecord) -> bool:
        if job.worker_token is not None:
            return job.worker_token == self.token
        return job.worker_pid == self.pid and job.worker_host == self.host

    # -- one job ----------------------------------------------------------------------------
    def process(self, job: JobRecord) -> None:
        """Validate then train a job this worker just claimed (status STARTED)."""
        self.store.add_event(job.id, "status-updated", {"status": STARTED,
                                                        "worker": f"{self.host}:{self.pid}"})
        with Hold(self.store, job.id, self.config.heartbeat_s, self.stopping) as hold:
            if not self.validate(job, hold):  # (a big file takes a while: keep the heartbeat)
                return
        job = self.store.get_job(job.id)
        if not job.auto_start:  # wait in VALIDATED for POST .../start
            self.store.set_status(job.id, VALIDATED, expect=(VALIDATED,), worker_pid=None,
                                  worker_host=None)
            log.info("job %s validated; waiting for POST /v1/fine_tuning/jobs/%s/start",
                     job.id, job.id)
            return
        self.train(job)

    def validate(self, job: JobRecord, hold: Hold | None = None) -> bool:
        """VALIDATING -> VALIDATED, or FAILED_VALIDATION / CANCELLED; True if validated.
        ``hold.should_stop`` is polled before every line: a cancel stops it within seconds."""
        if not self.store.set_status(job.id, VALIDATING, expect=(STARTED,), event={}):
            return self._settle_cancel(job.id)
        should_stop = hold.should_stop if hold is not None else self.stopping.is_set
        from souverain.finetune.data import Stopped

        tokenizer: Tokenizer | None = None
        validator: Callable[..., Any] | None = None
        try:
            if job.is_classifier:
                validator = self._classifier_validator(job, should_stop)
            else:
                tokenizer = self._load_tokenizer(job.model_path)
        except Stopped:
            validator = None
        except Exception as exc:
            self._finish(job, FAILED, error=f"Cannot load the tokenizer of base model "
                                            f"{job.model} ({job.model_path}): {exc}")
            return False
        checked = None if job.is_classifier and validator is None else \
            self._check_files(job, tokenizer, should_stop, validator)
        if checked is None:  # cancelled, or stopping: the next worker validates it again
            if (hold is not None and hold.cancel.is_set()) or \
                    self.store.get_job(job.id).status == CANCELLATION_REQUESTED:
                return self._settle_cancel(job.id)
            self.store.set_status(job.id, QUEUED, expect=(VALIDATING,), worker_pid=None,
                                  worker_host=None)
            return False
        problems, summary = checked
        if self.store.get_job(job.id).status == CANCELLATION_REQUESTED:
            return self._settle_cancel(job.id)
        if problems:
            self._validation_failed(job, problems, summary)
            return False
        data_tokens = sum(s["tokens"] for s in summary if s["role"] == "training")
        return self.store.set_status(job.id, VALIDATED, expect=(VALIDATING,),
                                     event={"files": summary, "data_tokens": data_tokens}) \
            or self._settle_cancel(job.id)

    def _classifier_validator(self, job: JobRecord, should_stop: Callable[[], bool]
                              ) -> Callable[..., Any]:
        """The check of a classifier job's files, against its targets: the declared ones
        (a missing loss_function taken from the data) or those its training files use,
        written to the job. A target problem is reported as the validation's first error."""
        from souverain.finetune import classifier_data as cd
        from souverain.finetune.classifier import base_tokenizer
        from souverain.finetune.data import DataReport, LineError

        paths = []
        for f in job.training_file_ids:
            try:
                paths.append(self.store.get_file(f).path)
            except NotFound:
                pass
        found = {t.name: t for t in cd.infer_targets(paths, should_stop)}
        if job.classifier_targets:
            targets = [cd.Target.from_dict(t) for t in job.classifier_targets]
            for t, d in zip(targets, job.classifier_targets, strict=True):
                if not d.get("loss_function") and t.name in found:
                    t.loss_function = found[t.name].loss_function
        else:
            targets = list(found.values())
        problem = cd.check_targets(targets)
        self.store.update(job.id, classifier_targets=[t.to_dict() for t in targets])
        count_tokens, max_tokens = base_tokenizer(job.model_path)

        def validate(path: str, _tokenizer: Any, **kw: Any) -> DataReport:
            report = cd.validate_classifier_file(path, targets, count_tokens=count_tokens,
                                                 max_tokens=max_tokens,
                                                 should_stop=kw.get("should_stop"))
            if problem:
                report.errors.insert(0, LineError(0, f"classifier targets: {problem}"))
            return report

        return validate

    def _check_files(self, job: JobRecord, tokenizer: Tokenizer | None,
                     should_stop: Callable[[], bool],
                     validator: Callable[..., Any] | None = None
                     ) -> tuple[list[str], list[dict[str, Any]]] | None:
        """Every problem of the job's files (one sentence each) and a summary per file; None
        when ``should_stop()`` (cancel, or the worker asked to stop) meanwhile."""
        from souverain.finetune.data import Stopped

        validator = validator or self._validator or _default_validator()
        hp = job.hyperparameters
        kw = {"seq_len": hp["seq_len"]} if hp.get("seq_len") else {}
        problems: list[str] = []
        summary = []
        files = [("training", f) for f in job.training_file_ids] + \
                [("validation", f) for f in job.validation_files]
        for role, file_id in files:
            if should_stop():
                return None
            try:
                rec = self.store.get_file(file_id)
            except NotFound:
                problems.append(f"{role} file {file_id} was deleted")
                continue
            try:
                report = validator(rec.path, tokenizer, method=method_of(self.store, job),
                                   should_stop=should_stop, **kw)
            except Stopped:
                return None
            except Exception as exc:
                problems.append(f"{rec.filename} ({role} file {file_id}): {exc}")
                continue
            for e in report.errors:
                problems.append(f"{rec.filename} line {e.line}: {e.message}" if e.line
                                else f"{rec.filename}: {e.message}")
            summary.append({"file_id": file_id, "filename": rec.filename, "role": role,
                            "samples": report.n_samples, "tokens": report.n_tokens,
                            "errors": len(report.errors)})
            if not report.errors and report.n_samples == 0:
                problems.append(f"{rec.filename} ({role} file {file_id}) has no samples")
        return problems, summary

    def _validation_failed(self, job: JobRecord, problems: list[str],
                           summary: list[dict[str, Any]]) -> None:
        listed = "; ".join(problems[:_MAX_LISTED_ERRORS])
        more = len(problems) - _MAX_LISTED_ERRORS
        error = (f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the "
                 f"training data: {listed}" + (f"; and {more} more" if more > 0 else "")
                 + ". Fix the files, upload them again and create a new job.")
        self.store.set_status(job.id, FAILED_VALIDATION, expect=(VALIDATING,),
                              event={"errors": problems[:200], "files": summary},
                              error=error, worker_pid=None, worker_host=None)

    def train(self, job: JobRecord, recovering: bool = False) -> None:
        """RUNNING -> SUCCESS | CANCELLED | FAILED (or left RUNNING, unowned, on shutdown)."""
        run_dir = Path(job.run_dir or self.store.runs_dir / job.id)
        resume = recovering and last_step(run_dir) > 0
        if recovering:
            self.store.add_event(job.id, "status-updated", {
                "status": RUNNING, "resumed": resume,
                "from_step": last_step(run_dir) if resume else 0})
        elif not self.store.set_status(job.id, RUNNING, expect=(VALIDATED,), event={}):
            self._settle_cancel(job.id)
            return
        try:
            cfg: Any = (classifier_train_config(self.store, job, run_dir) if job.is_classifier
                        else train_config(self.store, job, run_dir, self.config.threads))
        except Exception as exc:
            self._finish(job, FAILED, error=f"Invalid training settings: {exc}")
            return
        trainer = self._trainer or (_classifier_trainer() if job.is_classifier
                                    else _default_trainer())
        every = self.config.step_event_every_s
        progress = Progress.resumed(self.store, job.id, every, run_dir) if resume \
            else Progress(self.store, job.id, every)
        with Hold(self.store, job.id, self.config.heartbeat_s, self.stopping) as hold:
            try:
                _limit_threads(self.config.threads)
                result = trainer(cfg, resume=resume, on_event=self._recorder(job, progress),
                                 should_stop=hold.should_stop)
            except Exception as exc:  # the reason goes to the job
                if self.stopping.is_set() and not hold.cancel.is_set():
                    self._release(job, progress)
                    return
                log.exception("job %s failed", job.id)
                self._finish(job, FAILED, error=_failure(exc))
                return
            cancelled = hold.cancel.is_set() or \
                self.store.get_job(job.id).status == CANCELLATION_REQUESTED
        self._trained(job, result, progress, cancelled)

    def _recorder(self, job: JobRecord, progress: Progress) -> Callable[[dict[str, Any]], None]:
        def on_event(ev: dict[str, Any]) -> None:
            try:
                self._on_event(job, ev, progress)
            except Exception:  # bookkeeping must never stop training
                log.warning("job %s: recording event %s failed", job.id, ev.get("type"),
                            exc_info=True)

        return on_event

    def _on_event(self, job: JobRecord, ev: dict[str, Any], progress: Progress) -> None:
        """Each trainer event of ``job``, looked up per event: the place to watch the
        training from (tests stop the worker at a given step here)."""
        progress.record(ev)

    def _trained(self, job: JobRecord, result: Any, progress: Progress, cancelled: bool) -> None:
        """The trainer returned: CANCELLED, released (stopped for a shutdown) or SUCCESS."""
        if cancelled:
            self._finish(job, CANCELLED, expect=(CANCELLATION_REQUESTED, RUNNING),
                         event={"step": progress.step})
            return
        if getattr(result, "status", "completed") != "completed":  # stopped: shutdown
            self._release(job, progress)
            return
        tokens = progress.tokens or None
        name = fine_tuned_name(job.model, job.suffix, job.id)
        ok = self._finish(job, SUCCESS, expect=(RUNNING,), event={
            "fine_tuned_model": name, "steps": getattr(result, "steps", None)},
            fine_tuned_model=name, adapter_dir=str(result.final_dir),
            trained_tokens=int(tokens) if tokens else None)
        if not ok and self.store.get_job(job.id).status == CANCELLATION_REQUESTED:
            self._finish(job, CANCELLED, expect=(CANCELLATION_REQUESTED,), event={})
        log.info("job %s: %s", job.id, "SUCCESS -> " + name if ok else "cancelled")

    # -- helpers ----------------------------------------------------------------------------
    def _finish(self, job: JobRecord, status: str, *, error: str | None = None,
                expect: tuple[str, ...] = (STARTED, VALIDATING, VALIDATED, RUNNING,
                                           CANCELLATION_REQUESTED),
                event: dict[str, Any] | None = None, **values: Any) -> bool:
        ev = dict(event or {})
        if error:
            ev["error"] = error
        return self.store.set_status(job.id, status, expect=expect, event=ev, error=error,
                                     worker_pid=None, worker_host=None, **values)

    def _settle_cancel(self, job_id: str) -> bool:
        """A transition failed: the job was cancelled meanwhile; finish the cancel."""
        self.store.set_status(job_id, CANCELLED, expect=(CANCELLATION_REQUESTED,), event={},
                              worker_pid=None, worker_host=None)
        return False

    def _release(self, job: JobRecord, progress: Progress) -> None:
        """Shutting down mid-training: the job stays RUNNING with no owner, so the next
        worker resumes it from its last checkpoint at once."""
        self.store.add_event(job.id, "paused", {"step": progress.step,
                                                "reason": "the worker was stopped"})
        self.store.set_status(job.id, RUNNING, expect=(RUNNING,), worker_pid=None,
                              worker_host=None)
        log.info("job %s paused at step %s; it resumes when a worker starts", job.id,
                 progress.step)


def _failure(exc: BaseException) -> str:
    from souverain.errors import SouverainError

    if isinstance(exc, SouverainError):
        return str(exc)
    return (f"Training failed: {type(exc).__name__}: {exc}. The server log has the "
            "traceback.")


def _limit_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _tokenizer_of(model_path: str) -> Tokenizer:
    from souverain import weights

    tok = weights.load(model_path).tokenizer
    if tok is None:
        raise ValueError("the model folder has no tokenizer")
    return tok


def _default_validator() -> Callable[..., Any]:
    from souverain.finetune.data import validate_file

    return validate_file


def _default_trainer() -> Callable[..., Any]:
    from souverain.finetune.train import run_training

    return run_training


def _classifier_trainer() -> Callable[..., Any]:
    from souverain.finetune.classifier_train import run_classifier_training

    return run_classifier_training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m souverain.finetune.worker",
                                description="Run fine-tuning jobs from a souverain jobs "
                                            "database, one at a time.")
    p.add_argument("--db", default=None, help="Jobs database URL (default: sqlite under "
                                              "DATA/finetune/jobs.sqlite).")
    p.add_argument("--data-dir", default=None, help="souverain's data folder (default: "
                                                    "$SOUVERAIN_HOME).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training; 0 = all cores.")
    p.add_argument("--poll", type=float, default=1.0, help="Seconds between queue checks.")
    p.add_argument("--stale-after", type=float, default=60.0,
                   help="Seconds without a heartbeat after which a job's worker is presumed "
                        "dead and the job is resumed.")
    p.add_argument("--max-resumes", type=int, default=3)
    p.add_argument("--parent-pid", type=int, default=None,
                   help="Stop when this process (the server) is gone.")
    p.add_argument("--model", action="append", dest="models", default=None, metavar="NAME",
                   help="Take only jobs for this base model (a served model name; "
                        "repeatable). Default: any job.")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = JobStore(args.db, Path(args.data_dir).expanduser() if args.data_dir else None)
    worker = Worker(store, WorkerConfig(threads=args.threads or None, poll_s=args.poll,
                                        stale_after_s=args.stale_after,
                                        max_resumes=args.max_resumes,
                                        parent_pid=args.parent_pid,
                                        models=tuple(args.models) if args.models else None))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    store.close()
    return 0


class WorkerProcess:
    """The worker as a child process of the server: started and stopped with it."""

    def __init__(self, db_url: str, data_dir: Path | None, threads: int | None = 1,
                 log_level: str = "info", models: Iterable[str] | None = None):
        self.db_url, self.data_dir, self.threads = db_url, data_dir, threads
        self.models = list(models) if models is not None else None
        self.log_level = log_level
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "souverain.finetune.worker", "--db", self.db_url,
               "--threads", str(self.threads or 0), "--parent-pid", str(os.getpid()),
               "--log-level", self.log_level]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        for name in self.models or ():
            cmd += ["--model", name]
        # its own session: a Ctrl-C on the terminal reaches the server, which stops the worker
        # in order (training stops at a step boundary) instead of killing it mid-write
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        log.info("fine-tuning worker started (pid %d)", self.proc.pid)

    async def supervise(self, every: float = 2.0) -> None:
        """Start the worker again whenever it dies (killed, out of memory): its replacement
        resumes the interrupted job. Runs until cancelled."""
        import asyncio

        while True:
            await asyncio.sleep(every)
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("fine-tuning worker %d exited with %s; starting a new one",
                            self.proc.pid, self.proc.returncode)
                self.start()

    def stop(self, timeout: float = 30.0) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("fine-tuning worker %d did not stop in %.0f s; killing it",
                        self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
