"""Training a `ClassifierModel` (a fine-tuning job with ``job_type: "classifier"``).

`run_classifier_training(cfg, resume=, on_event=, should_stop=)` has `run_training`'s shape, so
the worker runs either the same way: the run folder of `souverain.finetune.run_state`
(config.json, metrics.jsonl, atomic ``checkpoints/step_NNNNNN`` with the trainable tensors and
``trainer_state.pt``, ``checkpoints/final`` = the model folder), the same events (``step``,
``eval``, ``checkpoint``, ``done``), ``should_stop`` polled before every step (a stop leaves
the last checkpoint for a resume; the cut step is dropped).

The loss of a batch is the weighted sum over targets of cross-entropy (single-label) or
binary cross-entropy over the labels (multi-label), each over the lines that label that
target. The order of the lines is a permutation per epoch drawn from ``seed + epoch``, so a
resumed run (optimizer, scheduler and RNG states restored) sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from souverain.errors import FinetuneError
from souverain.finetune.classifier import WEIGHTS_FILE, ClassifierModel
from souverain.finetune.classifier_data import (
    MULTI,
    Example,
    Target,
    check_targets,
    read_examples,
)
from souverain.finetune.data import LineError
from souverain.finetune.run_state import (
    STATE_FILE,
    Emitter,
    EventFn,
    checkpoints,
    restore_trainer_state,
    write_dir_atomically,
)
from souverain.finetune.train import TrainResult

HEAD_LR_FACTOR = 10.0  # the heads start from zero: they learn faster than the LoRA updates


@dataclass
class ClassifierTrainConfig:
    """One classifier run (the job's hyperparameters in La Plateforme's names)."""

    model: str  # the encoder folder (or souverain-embed)
    train_files: list[str]
    run_dir: str
    targets: list[dict[str, Any]]
    eval_files: list[str] = field(default_factory=list)
    base_name: str | None = None
    max_steps: int | None = None
    epochs: float | None = None  # default 3 when neither is given
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    lora_rank: int = 16
    lora_scaling: float = 2.0
    max_tokens: int | None = None
    checkpoint_every: int | None = None  # None: a fifth of the run, at most 50 steps
    eval_every: int | None = None  # with eval files; None: at each checkpoint
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_examples(paths: list[str]) -> list[Example]:
    out: list[Example] = []
    for p in paths:
        for ex in read_examples(p):
            if isinstance(ex, LineError):
                raise FinetuneError(f"{p} line {ex.line}: {ex.message}")
            out.append(ex)
    return out


def batch_loss(model: ClassifierModel, batch: list[Example],
               logits: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted sum over targets of each target's mean loss over the lines that label it."""
    if logits is None:
        logits = model.logits([ex.text for ex in batch])
    total = torch.zeros(())
    for t, lg in zip(model.targets, logits, strict=True):
        rows = [i for i, ex in enumerate(batch) if t.name in ex.labels]
        if not rows:
            continue
        idx = torch.tensor(rows)
        if t.loss_function == MULTI:
            y = torch.zeros(len(rows), len(t.labels))
            for r, i in enumerate(rows):
                for label in batch[i].labels[t.name]:
                    y[r, t.labels.index(label)] = 1.0
            loss = F.binary_cross_entropy_with_logits(lg.index_select(0, idx), y)
        else:
            y_idx = torch.tensor([t.labels.index(batch[i].labels[t.name][0]) for i in rows])
            loss = F.cross_entropy(lg.index_select(0, idx), y_idx)
        total = total + t.weight * loss
    return total


@torch.no_grad()
def evaluate(model: ClassifierModel, examples: list[Example], batch_size: int = 64
             ) -> dict[str, Any]:
    """Loss and accuracy on ``examples``: single-label, the argmax is the label; multi-label,
    the labels over 0.5 are exactly the given set. Per target and over all."""
    from souverain.finetune.classifier import probabilities

    model.eval()
    loss_sum = 0.0
    right = {t.name: 0 for t in model.targets}
    seen = {t.name: 0 for t in model.targets}
    for at in range(0, len(examples), batch_size):
        batch = examples[at:at + batch_size]
        logits = model.logits([ex.text for ex in batch])
        loss_sum += float(batch_loss(model, batch, logits)) * len(batch)
        for t, lg in zip(model.targets, logits, strict=True):
            probs = probabilities(t, lg)
            for ex, p in zip(batch, probs, strict=True):
                if t.name not in ex.labels:
                    continue
                seen[t.name] += 1
                if t.loss_function == MULTI:
                    ok = {t.labels[i] for i in range(len(t.labels)) if p[i] > 0.5} == \
                        set(ex.labels[t.name])
                else:
                    ok = t.labels[int(p.argmax())] == ex.labels[t.name][0]
                right[t.name] += int(ok)
    model.train()
    n = sum(seen.values())
    return {"eval_loss": loss_sum / max(1, len(examples)),
            "eval_accuracy": sum(right.values()) / n if n else None,
            "accuracy_per_target": {k: right[k] / seen[k] for k in seen if seen[k]}}


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        rest = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / rest)))

    return f


def _order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def run_classifier_training(cfg: ClassifierTrainConfig, *, resume: bool = False,
                            on_event: EventFn | None = None,
                            should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train, checkpoint, and write ``checkpoints/final`` (the model folder)."""
    run_dir = Path(cfg.run_dir)
    existing = checkpoints(run_dir)
    if existing and not resume:
        raise FinetuneError(f"{run_dir} already holds checkpoints of a run; resume it or "
                            "choose another run folder.")
    targets = [Target.from_dict(t) for t in cfg.targets]
    problem = check_targets(targets)
    if problem:
        raise FinetuneError(f"Invalid classifier targets: {problem}.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    emit = Emitter(run_dir, on_event)
    torch.manual_seed(cfg.seed)
    train = load_examples(cfg.train_files)
    evals = load_examples(cfg.eval_files)
    if not train:
        raise FinetuneError("The training files hold no sample.")
    model = ClassifierModel(cfg.model, targets, lora_rank=cfg.lora_rank,
                            lora_scaling=cfg.lora_scaling, max_tokens=cfg.max_tokens,
                            base_name=cfg.base_name)
    model.train()
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(per_epoch * (cfg.epochs or 3.0)))
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("heads.")]
    lora = [p for n, p in model.named_parameters() if p.requires_grad
            and not n.startswith("heads.")]
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.learning_rate},
                             {"params": heads, "lr": cfg.learning_rate * HEAD_LR_FACTOR}],
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(cfg.warmup_fraction * total)))
    every = cfg.checkpoint_every or max(1, min(50, total // 5))
    eval_every = cfg.eval_every or every
    step = 0
    if resume and existing:
        from safetensors.torch import load_file

        last = existing[-1]
        model.load_trainable(load_file(str(last / WEIGHTS_FILE)))
        step = restore_trainer_state(last, opt, sched)
        emit({"type": "resume", "step": step, "path": str(last)})
    elif evals:
        emit({"type": "eval", "step": 0, **evaluate(model, evals)})
    last_ckpt: Path | None = existing[-1] if existing else None
    metrics: dict[str, Any] = {}
    while step < total:
        if should_stop is not None and should_stop():
            emit({"type": "done", "status": "cancelled", "step": step,
                  "path": str(last_ckpt) if last_ckpt else None})
            return TrainResult(final_dir=last_ckpt or run_dir, steps=step, status="cancelled")
        epoch, pos = divmod(step, per_epoch)
        order = _order(len(train), epoch, cfg.seed)
        batch = [train[i] for i in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
        t0 = time.perf_counter()
        loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + heads, 1.0)
        opt.step()
        sched.step()
        step += 1
        emit({"type": "step", "step": step, "total_steps": total, "loss": float(loss.detach()),
              "lr": sched.get_last_lr()[0], "samples": len(batch),
              "tokens": sum(model.count_tokens([ex.text for ex in batch])),
              "seconds": round(time.perf_counter() - t0, 4)})
        if evals and (step % eval_every == 0 or step == total):
            metrics = {"step": step, **evaluate(model, evals)}
            emit({"type": "eval", **metrics})
        if step % every == 0 and step < total:
            last_ckpt = _checkpoint(model, run_dir, step, total, opt, sched, cfg)
            emit({"type": "checkpoint", "step": step, "path": str(last_ckpt)})
    final = write_dir_atomically(run_dir / "checkpoints" / "final", model.save)
    if evals and metrics.get("step") != step:
        metrics = {"step": step, **evaluate(model, evals)}
    metrics.pop("step", None)
    (final / "metrics.json").write_text(json.dumps({"steps": step, **metrics}))
    emit({"type": "checkpoint", "step": step, "path": str(final)})
    emit({"type": "done", "status": "completed", "step": step, "path": str(final), **metrics})
    return TrainResult(final_dir=final, steps=step, metrics=metrics)


def _checkpoint(model: ClassifierModel, run_dir: Path, step: int, total: int,
                opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                cfg: ClassifierTrainConfig) -> Path:
    import random

    import numpy as np
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file(model.trainable_state(), str(tmp / WEIGHTS_FILE))
        torch.save({"step": step, "total_steps": total, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state()},
                    "config": cfg.to_dict()}, tmp / STATE_FILE)

    return write_dir_atomically(run_dir / "checkpoints" / f"step_{step:06d}", fill)
