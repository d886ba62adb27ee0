"""The fine-tuning worker: a separate OS process that runs the jobs of a `JobStore`.

    python -m souverain.finetune.worker --db sqlite:///DATA/finetune/jobs.sqlite --data-dir DATA

`souverain serve` starts one (unless ``--no-finetune``) and stops it with itself, so training
never competes with the event loop that serves requests, and uses few threads (1 by default)
when it shares the machine with serving.

One job at a time: claim the oldest QUEUED job (atomic), VALIDATING (``validate_file`` on every
file; errors -> FAILED_VALIDATION naming file and line), VALIDATED (stop here when the job was
created with ``auto_start=false``), RUNNING (``run_training``: events, checkpoint rows and a
heartbeat go to the store; a cancel request stops it at the next step), then SUCCESS (with
``fine_tuned_model`` and the final adapter folder) | CANCELLED | FAILED (the exception's
message).

Nothing is lost to a crash or a restart: the worker looks for jobs whose worker is gone (its pid
is dead on this host, or its heartbeat is older than ``--stale-after``) at start and between
jobs. A job caught while validating is queued again; one caught RUNNING is resumed from its
last checkpoint (``run_training(resume=True)``) or trained again from the start when it had
none; after ``--max-resumes`` unclean stops it is marked FAILED with the reason. A worker asked
to stop (SIGTERM, or its parent server gone) stops training at the next step and leaves the job
RUNNING without an owner, for the next worker to resume at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    fine_tuned_name,
    this_host,
)

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


class _Hold:
    """A job this worker holds: a heartbeat thread that also notices cancel requests."""

    def __init__(self, store: JobStore, job_id: str, every: float, stopping: threading.Event):
        self.store, self.job_id, self.every = store, job_id, every
        self.cancel = threading.Event()
        self._done = threading.Event()
        self._stopping = stopping
        self._thread = threading.Thread(target=self._beat, name="souverain-ft-heartbeat",
                                        daemon=True)

    def __enter__(self) -> _Hold:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            try:
                if self.store.heartbeat(self.job_id) in (CANCELLATION_REQUESTED, CANCELLED):
                    self.cancel.set()
            except Exception:  # a busy database must not stop training
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self._stopping.is_set()


class Worker:
    """Runs jobs from ``store`` one at a time. ``trainer``, ``validator`` and
    ``load_tokenizer`` default to souverain's (`run_training`, `validate_file`, the base model's
    tokenizer); tests may pass their own."""

    def __init__(self, store: JobStore, config: WorkerConfig | None = None, *,
                 trainer: Callable[..., Any] | None = None,
                 validator: Callable[..., Any] | None = None,
                 load_tokenizer: Callable[[str], Any] | None = None):
        self.store = store
        self.config = config or WorkerConfig()
        self.pid = os.getpid()
        self.host = this_host()
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
        log.info("fine-tuning worker %s:%d ready (threads=%s, database %s)", self.host,
                 self.pid, self.config.threads, _safe_url(self.store.url))
        while not self.stopping.is_set():
            try:
                if not self.run_once():
                    self.stopping.wait(self.config.poll_s)
            except Exception:  # e.g. the database briefly unreachable: retry
                log.exception("fine-tuning worker loop failed; retrying")
                self.stopping.wait(max(self.config.poll_s, 2.0))
        log.info("fine-tuning worker %d stopped", self.pid)

    def run_once(self) -> bool:
        """Recover orphaned jobs, then run the next queued one; False when there was nothing."""
        did = self.recover()
        if self.stopping.is_set():
            return did
        job = self.store.claim_next(self.pid, self.host)
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
        for job in self.store.orphans(stale_after=self.config.stale_after_s, host=self.host):
            if self.stopping.is_set():
                break
            if job.worker_pid == self.pid and job.worker_host == self.host:
                continue
            if not self.store.adopt(job, self.pid, self.host):
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

    # -- one job ----------------------------------------------------------------------------
    def process(self, job: JobRecord) -> None:
        """Validate then train a job this worker just claimed (status STARTED)."""
        self.store.add_event(job.id, "status-updated", {"status": STARTED,
                                                        "worker": f"{self.host}:{self.pid}"})
        with _Hold(self.store, job.id, self.config.heartbeat_s, self.stopping):
            if not self.validate(job):  # (a big file takes a while: keep the heartbeat)
                return
        job = self.store.get_job(job.id)
        if not job.auto_start:  # wait in VALIDATED for POST .../start
            self.store.set_status(job.id, VALIDATED, expect=(VALIDATED,), worker_pid=None,
                                  worker_host=None)
            log.info("job %s validated; waiting for POST /v1/fine_tuning/jobs/%s/start",
                     job.id, job.id)
            return
        self.train(job)

    def validate(self, job: JobRecord) -> bool:
        """VALIDATING -> VALIDATED, or FAILED_VALIDATION / CANCELLED; True if validated."""
        if not self.store.set_status(job.id, VALIDATING, expect=(STARTED,), event={}):
            return self._settle_cancel(job.id)
        hp = job.hyperparameters
        try:
            tokenizer = self._load_tokenizer(job.model_path)
        except Exception as exc:
            self._finish(job, FAILED, error=f"Cannot load the tokenizer of base model "
                                            f"{job.model} ({job.model_path}): {exc}")
            return False
        validator = self._validator or _default_validator()
        problems: list[str] = []
        summary = []
        files = [("training", f) for f in job.training_file_ids] + \
                [("validation", f) for f in job.validation_files]
        for role, file_id in files:
            if self.stopping.is_set():
                self.store.set_status(job.id, QUEUED, expect=(VALIDATING,), worker_pid=None,
                                      worker_host=None)
                return False
            try:
                rec = self.store.get_file(file_id)
            except NotFound:
                problems.append(f"{role} file {file_id} was deleted")
                continue
            try:
                kw = {"seq_len": hp["seq_len"]} if hp.get("seq_len") else {}
                report = validator(rec.path, tokenizer, method=self._method(job), **kw)
            except Exception as exc:
                problems.append(f"{rec.filename} ({role} file {file_id}): {exc}")
                continue
            for e in report.errors:
                problems.append(f"{rec.filename} line {e.line}: {e.message}")
            summary.append({"file_id": file_id, "filename": rec.filename, "role": role,
                            "samples": report.n_samples, "tokens": report.n_tokens,
                            "errors": len(report.errors)})
            if not report.errors and report.n_samples == 0:
                problems.append(f"{rec.filename} ({role} file {file_id}) has no samples")
        if self.store.get_job(job.id).status == CANCELLATION_REQUESTED:
            return self._settle_cancel(job.id)
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED_ERRORS])
            more = len(problems) - _MAX_LISTED_ERRORS
            error = (f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the "
                     f"training data: {listed}" + (f"; and {more} more" if more > 0 else "")
                     + ". Fix the files, upload them again and create a new job.")
            self.store.set_status(job.id, FAILED_VALIDATION, expect=(VALIDATING,),
                                  event={"errors": problems[:200], "files": summary},
                                  error=error, worker_pid=None, worker_host=None)
            return False
        data_tokens = sum(s["tokens"] for s in summary if s["role"] == "training")
        return self.store.set_status(job.id, VALIDATED, expect=(VALIDATING,),
                                     event={"files": summary, "data_tokens": data_tokens}) \
            or self._settle_cancel(job.id)

    def train(self, job: JobRecord, recovering: bool = False) -> None:
        """RUNNING -> SUCCESS | CANCELLED | FAILED (or left RUNNING, unowned, on shutdown)."""
        run_dir = Path(job.run_dir or self.store.runs_dir / job.id)
        resume = recovering and _has_checkpoint(run_dir)
        if recovering:
            self.store.add_event(job.id, "status-updated", {
                "status": RUNNING, "resumed": resume,
                "from_step": _last_step(run_dir) if resume else 0})
        elif not self.store.set_status(job.id, RUNNING, expect=(VALIDATED,), event={}):
            self._settle_cancel(job.id)
            return
        try:
            cfg = self._train_config(job, run_dir)
        except Exception as exc:
            self._finish(job, FAILED, error=f"Invalid training settings: {exc}")
            return
        trainer = self._trainer or _default_trainer()
        state: dict[str, Any] = {"loss": None, "eval": None, "last_event": 0.0, "step": 0,
                                 "tokens": self._tokens_at(job.id, _last_step(run_dir))
                                 if resume else 0}

        def on_event(ev: dict[str, Any]) -> None:
            try:
                self._on_event(job, ev, state)
            except Exception:  # bookkeeping must never stop training
                log.warning("job %s: recording event %s failed", job.id, ev.get("type"),
                            exc_info=True)

        with _Hold(self.store, job.id, self.config.heartbeat_s, self.stopping) as hold:
            try:
                _limit_threads(self.config.threads)
                result = trainer(cfg, resume=resume, on_event=on_event,
                                 should_stop=hold.should_stop)
            except Exception as exc:  # the reason goes to the job
                if self.stopping.is_set() and not hold.cancel.is_set():
                    self._release(job, state)
                    return
                log.exception("job %s failed", job.id)
                self._finish(job, FAILED, error=_failure(exc))
                return
            cancelled = hold.cancel.is_set() or \
                self.store.get_job(job.id).status == CANCELLATION_REQUESTED
        if cancelled:
            self._finish(job, CANCELLED, expect=(CANCELLATION_REQUESTED, RUNNING),
                         event={"step": state["step"]})
        elif getattr(result, "status", "completed") != "completed":  # stopped: shutdown
            self._release(job, state)
        else:
            tokens = state["tokens"] or None
            name = fine_tuned_name(job.model, job.suffix, job.id)
            ok = self._finish(job, SUCCESS, expect=(RUNNING,), event={
                "fine_tuned_model": name, "steps": getattr(result, "steps", None)},
                fine_tuned_model=name, adapter_dir=str(result.final_dir),
                trained_tokens=int(tokens) if tokens else None)
            if not ok and self.store.get_job(job.id).status == CANCELLATION_REQUESTED:
                self._finish(job, CANCELLED, expect=(CANCELLATION_REQUESTED,), event={})
            log.info("job %s: %s", job.id, "SUCCESS -> " + name if ok else "cancelled")

    # -- helpers ----------------------------------------------------------------------------
    def _train_config(self, job: JobRecord, run_dir: Path) -> Any:
        from souverain.finetune.config import LoRAConfig, TrainConfig

        hp = job.hyperparameters
        paths = [self.store.get_file(f).path for f in job.training_file_ids]
        evals = [self.store.get_file(f).path for f in job.validation_files]
        steps = hp.get("training_steps")
        every = max(1, min(50, steps // 5)) if steps else 50
        kw: dict[str, Any] = {
            "model": job.model_path, "train_files": paths, "eval_files": evals,
            "run_dir": str(run_dir),
            "max_steps": steps, "epochs": hp.get("epochs"),
            "learning_rate": hp.get("learning_rate", 1e-4),
            "weight_decay": hp.get("weight_decay", 0.1),
            "warmup_fraction": hp.get("warmup_fraction", 0.05),
            "method": self._method(job), "checkpoint_every": every,
            "eval_every": every if evals else None,
            "threads": self.config.threads, "lora": LoRAConfig(rank=hp.get("lora_rank") or 16)}
        if hp.get("seq_len"):
            kw["seq_len"] = hp["seq_len"]
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in kw.items() if k in known})

    def _tokens_at(self, job_id: str, step: int) -> int:
        """Tokens trained up to checkpoint ``step`` (a resumed run counts on from there)."""
        for c in self.store.checkpoints(job_id):
            if c.step == step:
                return int(c.metrics.get("trained_tokens") or 0)
        return 0

    def _method(self, job: JobRecord) -> str:
        """DPO when every training file holds preference pairs, else SFT."""
        kinds = set()
        for f in job.training_file_ids:
            try:
                kinds.add(self.store.get_file(f).sample_type)
            except NotFound:
                pass
        return "dpo" if kinds == {"preference"} else "sft"

    def _on_event(self, job: JobRecord, ev: dict[str, Any], state: dict[str, Any]) -> None:
        kind = ev.get("type")
        data = {k: v for k, v in ev.items() if k != "type"}
        if kind == "step":
            state["step"] = int(ev.get("step") or 0)
            state["loss"] = ev.get("loss")
            state["tokens"] += int(ev.get("tokens") or 0)  # this step's tokens
            now = time.monotonic()
            last = ev.get("total_steps") is not None and ev.get("step") == ev["total_steps"]
            if now - state["last_event"] >= self.config.step_event_every_s or last \
                    or state["step"] <= 1:
                state["last_event"] = now
                self.store.add_event(job.id, "training-step", data)
        elif kind == "eval":
            state["eval"] = ev
            self.store.add_event(job.id, "evaluation", data)
        elif kind == "checkpoint":
            ev_eval = state["eval"] or {}
            metrics = {"train_loss": state["loss"],
                       "valid_loss": ev_eval.get("eval_loss"),
                       "valid_mean_token_accuracy": ev_eval.get("eval_accuracy"),
                       "trained_tokens": state["tokens"]}
            self.store.add_checkpoint(job.id, int(ev.get("step") or 0), str(ev.get("path")),
                                      metrics)
            self.store.update(job.id, trained_tokens=state["tokens"])
        elif kind == "done":
            self.store.add_event(job.id, "training-done", data)
        else:
            self.store.add_event(job.id, str(kind or "event"), data)

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

    def _release(self, job: JobRecord, state: dict[str, Any]) -> None:
        """Shutting down mid-training: the job stays RUNNING with no owner, so the next
        worker resumes it from its last checkpoint at once."""
        self.store.add_event(job.id, "paused", {"step": state["step"],
                                                "reason": "the worker was stopped"})
        self.store.set_status(job.id, RUNNING, expect=(RUNNING,), worker_pid=None,
                              worker_host=None)
        log.info("job %s paused at step %s; it resumes when a worker starts", job.id,
                 state["step"])


def _has_checkpoint(run_dir: Path) -> bool:
    return _last_step(run_dir) > 0


def _last_step(run_dir: Path) -> int:
    steps = [int(p.name.split("_", 1)[1]) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name.split("_", 1)[1].isdigit()]
    return max(steps, default=0)


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


def _tokenizer_of(model_path: str) -> Any:
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


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


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
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = JobStore(args.db, Path(args.data_dir).expanduser() if args.data_dir else None)
    worker = Worker(store, WorkerConfig(threads=args.threads or None, poll_s=args.poll,
                                        stale_after_s=args.stale_after,
                                        max_resumes=args.max_resumes,
                                        parent_pid=args.parent_pid))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    store.close()
    return 0


class WorkerProcess:
    """The worker as a child process of the server: started and stopped with it."""

    def __init__(self, db_url: str, data_dir: Path | None, threads: int | None = 1,
                 log_level: str = "info"):
        self.db_url, self.data_dir, self.threads = db_url, data_dir, threads
        self.log_level = log_level
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "souverain.finetune.worker", "--db", self.db_url,
               "--threads", str(self.threads or 0), "--parent-pid", str(os.getpid()),
               "--log-level", self.log_level]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
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
