"""One job as the worker holds it: its heartbeat, its `TrainConfig`, its progress in the store.

`Hold` beats the job's heartbeat on a thread while the worker validates or trains it, and
notices a cancel request there.

`train_config` turns the job's hyperparameters (La Plateforme's names) into a `TrainConfig`;
`method_of` picks DPO when every training file holds preference pairs; `last_step` finds
where a resumed run starts. `Progress` receives `run_training`'s events and writes them to the
`JobStore`: training-step events (throttled), evaluations, a checkpoint row per checkpoint
with its metrics, the trained-token count.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from souverain.finetune.config import LoRAConfig, TrainConfig
from souverain.finetune.store import (
    CANCELLATION_REQUESTED,
    CANCELLED,
    JobRecord,
    JobStore,
    NotFound,
)

if TYPE_CHECKING:
    from souverain.finetune.classifier_train import ClassifierTrainConfig

log = logging.getLogger(__name__)


class Hold:
    """A job a worker holds, as a context: a heartbeat thread that also notices cancel
    requests; `should_stop` is what the trainer polls before each step."""

    def __init__(self, store: JobStore, job_id: str, every: float, stopping: threading.Event):
        self.store, self.job_id, self.every = store, job_id, every
        self.cancel = threading.Event()
        self._done = threading.Event()
        self._stopping = stopping
        self._thread = threading.Thread(target=self._beat, name="souverain-ft-heartbeat",
                                        daemon=True)

    def __enter__(self) -> Hold:
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


def method_of(store: JobStore, job: JobRecord) -> str:
    """DPO when every training file holds preference pairs, else SFT."""
    kinds = set()
    for f in job.training_file_ids:
        try:
            kinds.add(store.get_file(f).sample_type)
        except NotFound:
            pass
    return "dpo" if kinds == {"preference"} else "sft"


def train_config(
    store: JobStore, job: JobRecord, run_dir: Path, threads: int | None
) -> TrainConfig:
    """The training settings of ``job``: its files, its hyperparameters (defaults where it
    gave none), a checkpoint (and eval, with validation files) every fifth of the run, at
    most every 50 steps."""
    hp = job.hyperparameters
    paths = [store.get_file(f).path for f in job.training_file_ids]
    evals = [store.get_file(f).path for f in job.validation_files]
    steps = hp.get("training_steps")
    every = max(1, min(50, steps // 5)) if steps else 50
    kw: dict[str, Any] = {
        "model": job.model_path, "train_files": paths, "eval_files": evals,
        "run_dir": str(run_dir),
        "max_steps": steps, "epochs": hp.get("epochs"),
        "learning_rate": hp.get("learning_rate", 1e-4),
        "weight_decay": hp.get("weight_decay", 0.1),
        "warmup_fraction": hp.get("warmup_fraction", 0.05),
        "method": method_of(store, job), "checkpoint_every": every,
        "eval_every": every if evals else None,
        "threads": threads, "lora": LoRAConfig(rank=hp.get("lora_rank") or 16)}
    if hp.get("seq_len"):
        kw["seq_len"] = hp["seq_len"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kw.items() if k in known})


def classifier_train_config(store: JobStore, job: JobRecord,
                            run_dir: Path) -> ClassifierTrainConfig:
    """A classifier job's settings: its targets (filled at validation), files and
    hyperparameters (the trainer checkpoints, and evaluates, every fifth of the run, at most
    every 50 steps)."""
    from souverain.finetune.classifier_train import ClassifierTrainConfig

    hp = job.hyperparameters
    evals = [store.get_file(f).path for f in job.validation_files]
    return ClassifierTrainConfig(
        model=job.model_path, base_name=job.model, run_dir=str(run_dir),
        train_files=[store.get_file(f).path for f in job.training_file_ids],
        eval_files=evals, targets=list(job.classifier_targets or []),
        max_steps=hp.get("training_steps"), epochs=hp.get("epochs"),
        learning_rate=hp.get("learning_rate", 1e-4),
        weight_decay=hp.get("weight_decay", 0.1),
        warmup_fraction=hp.get("warmup_fraction", 0.05),
        lora_rank=hp.get("lora_rank") or 16, max_tokens=hp.get("seq_len"))


def last_step(run_dir: Path) -> int:
    """The step of the newest checkpoint folder of a run (0 without one)."""
    steps = [int(p.name.split("_", 1)[1]) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name.split("_", 1)[1].isdigit()]
    return max(steps, default=0)


@dataclass
class Progress:
    """Where a job's training stands, kept up to date from the trainer's events (the only
    writer of its step / loss / token counts)."""

    store: JobStore
    job_id: str
    step_event_every_s: float
    tokens: int = 0  # trained so far (a resumed run counts on from its checkpoint)
    step: int = 0
    loss: float | None = None
    eval: dict[str, Any] | None = None
    last_event: float = 0.0

    @classmethod
    def resumed(cls, store: JobStore, job_id: str, every_s: float, run_dir: Path) -> Progress:
        """Progress of a run resumed from its last checkpoint: tokens counted up to there."""
        step = last_step(run_dir)
        tokens = 0
        for c in store.checkpoints(job_id):
            if c.step == step:
                tokens = int(c.metrics.get("trained_tokens") or 0)
                break
        return cls(store, job_id, every_s, tokens=tokens)

    def record(self, ev: dict[str, Any]) -> None:
        """One event of `run_training` into the store."""
        kind = ev.get("type")
        data = {k: v for k, v in ev.items() if k != "type"}
        if kind == "step":
            self._step(ev, data)
        elif kind == "eval":
            self.eval = ev
            self.store.add_event(self.job_id, "evaluation", data)
        elif kind == "checkpoint":
            self._checkpoint(ev)
        elif kind == "done":
            self.store.add_event(self.job_id, "training-done", data)
        else:
            self.store.add_event(self.job_id, str(kind or "event"), data)

    def _step(self, ev: dict[str, Any], data: dict[str, Any]) -> None:
        self.step = int(ev.get("step") or 0)
        self.loss = ev.get("loss")
        self.tokens += int(ev.get("tokens") or 0)  # this step's tokens
        now = time.monotonic()
        last = ev.get("total_steps") is not None and ev.get("step") == ev["total_steps"]
        # the first and last steps always show; those between at most every few seconds
        if now - self.last_event >= self.step_event_every_s or last or self.step <= 1:
            self.last_event = now
            self.store.add_event(self.job_id, "training-step", data)

    def _checkpoint(self, ev: dict[str, Any]) -> None:
        ev_eval = self.eval or {}
        metrics = {"train_loss": self.loss,
                   "valid_loss": ev_eval.get("eval_loss"),
                   "valid_mean_token_accuracy": ev_eval.get("eval_accuracy"),
                   "trained_tokens": self.tokens}
        self.store.add_checkpoint(self.job_id, int(ev.get("step") or 0), str(ev.get("path")),
                                  metrics)
        self.store.update(self.job_id, trained_tokens=self.tokens)
