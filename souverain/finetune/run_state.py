"""What a training run keeps in its folder, and how it is written and read back.

    run_dir/config.json                 the TrainConfig the run started with
    run_dir/metrics.jsonl               one line per event (`Emitter`)
    run_dir/checkpoints/step_NNNNNN/    adapter + ``trainer_state.pt`` (optimizer, scheduler,
                                        the python / numpy / torch RNG states, the step)
    run_dir/checkpoints/final/          adapter + metrics.json

Every checkpoint folder is written atomically (a temporary folder, then a rename), so a run
killed at any moment leaves only whole checkpoints; restoring one brings back every state the
next step depends on, which makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from souverain.errors import FinetuneError
from souverain.finetune.config import TrainConfig

EventFn = Callable[[dict[str, Any]], None]
STATE_FILE = "trainer_state.pt"
# config fields that change the trajectory: a resumed run must have the same ones
_TRAJECTORY = (
    "model",
    "train_files",
    "method",
    "seq_len",
    "batch_size",
    "grad_accum",
    "max_steps",
    "epochs",
    "learning_rate",
    "weight_decay",
    "warmup_fraction",
    "schedule",
    "max_grad_norm",
    "dtype",
    "seed",
    "lora",
    "dpo_beta",
)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete step checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()
    )


def check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> list[Path]:
    """The run's checkpoints, once sure that ``cfg`` may run in ``run_dir``: a new run needs
    a folder without a run, a resumed one the config it started with."""
    existing = checkpoints(run_dir)
    if existing and not resume:
        raise FinetuneError(
            f"{run_dir} already holds checkpoints of a run; resume it "
            "(--resume) or choose another run_dir."
        )
    if (run_dir / "checkpoints" / "final").exists() and not existing and not resume:
        raise FinetuneError(f"{run_dir} holds a finished run; choose another run_dir.")
    saved_cfg = run_dir / "config.json"
    if resume and saved_cfg.is_file():
        before = json.loads(saved_cfg.read_text())
        current = cfg.to_dict()
        changed = [k for k in _TRAJECTORY if before.get(k) != current.get(k)]
        if changed:
            raise FinetuneError(
                f"cannot resume {run_dir}: the config changed ({', '.join(changed)}"
                "); put it back, or start a new run_dir."
            )
    return existing


def start_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Create the run's folders and record its config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    """``final`` filled by ``fill(tmp)`` in a temporary folder, then renamed into place."""
    tmp = final.with_name(f".tmp_{final.name}_{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def trainer_state(
    cfg: TrainConfig,
    step: int,
    total: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Everything but the adapter that the steps after ``step`` depend on."""
    return {
        "step": step,
        "microbatch": step * cfg.grad_accum,
        "total_steps": total,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        "config": cfg.to_dict(),
    }


def restore_trainer_state(
    checkpoint: Path,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Load a checkpoint's optimizer, scheduler and RNG states; returns its step."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"])


class Emitter:
    """A run's events: appended to ``metrics.jsonl`` (with their time), then passed on."""

    def __init__(self, run_dir: Path, on_event: EventFn | None):
        self.path = run_dir / "metrics.jsonl"
        self.on_event = on_event

    def __call__(self, event: dict[str, Any]) -> None:
        event = {**event, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.on_event is not None:
            self.on_event(event)
