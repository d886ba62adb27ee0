"""`run_training`: LoRA SFT or DPO on CPU, with checkpoints that resume bit for bit.

One run, top to bottom:
1. validate and tokenize every data file (`data.load_dataset`): any bad line -> FinetuneError,
   nothing starts;
2. load the base unfused and unquantized (float32 or bfloat16), freeze it, wrap the target
   linears in `LoRALinear` (A kaiming-uniform, B zeros: the adapted model starts equal to the
   base);
3. SFT samples are shuffled once (seeded) and packed into sequences of at most ``seq_len``
   tokens; DPO pairs are units of their own. Each epoch visits the units in a seeded
   permutation of its own, so the microbatch at global index ``g`` is a pure function of
   (seed, g): resuming needs no iterator state beyond the step;
4. each optimizer step sums ``grad_accum`` microbatches of ``batch_size`` units; SFT loss is
   ``sum(CE * mask) / sum(mask)`` over the whole step (assistant tokens only), DPO loss the
   mean over its pairs; AdamW (0.9, 0.95), warmup then cosine / one-cycle / constant, gradient
   norm clipped;
5. every ``checkpoint_every`` steps ``checkpoints/step_NNNNNN/`` is written atomically (tmp dir
   + rename): the adapter (both formats) and ``trainer_state.pt`` (optimizer, scheduler, the
   python / numpy / torch RNG states, the step). ``resume=True`` restores all of it, so a run
   killed with SIGKILL and resumed ends with the very tensors an uninterrupted run gives
   (same machine, same thread count). The run folder's layout and its atomic writes are
   run_state.py's.

``should_stop()`` is polled before every line while the data is validated, before every
evaluation batch, before every step and between the microbatches of a step, so a cancel (or a
shutdown) takes effect within about one microbatch's work. A step interrupted half-way is
dropped (gradients cleared, RNG states put back): the checkpoint written then is exactly the
one of the last whole step, and resuming from it stays bit-exact.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from souverain.errors import FinetuneError
from souverain.finetune.config import TrainConfig
from souverain.finetune.data import Sample, Stopped, batch_tensors, load_dataset, pack
from souverain.finetune.dpo import pair_losses
from souverain.finetune.lora import inject_lora, load_into, lora_layers, to_adapter
from souverain.finetune.run_state import (
    STATE_FILE,
    Emitter,
    EventFn,
    check_run_dir,
    checkpoints,
    restore_trainer_state,
    start_run_dir,
    trainer_state,
    write_dir_atomically,
)
from souverain.models.attention import PrefillAttention
from souverain.models.transformer import Transformer
from souverain.weights.adapter import load_adapter, save_adapter


@dataclass
class TrainResult:
    final_dir: Path  # checkpoints/final, or the last checkpoint of a cancelled run
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"  # "completed" | "cancelled"


# --------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------


def sft_loss_sum(model: Transformer, samples: list[Sample]) -> tuple[torch.Tensor, int, int]:
    """(sum of the CE of the trained tokens, their count, tokens forwarded) for one flat
    packed batch. Logits are computed only for the trained rows (the head is the costliest
    matmul of a small model)."""
    tokens, positions, targets, mask, lens = batch_tensors(samples)
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return torch.zeros((), requires_grad=True), 0, int(tokens.numel())
    logits = model(tokens, positions, PrefillAttention(lens), logits_indices=rows)
    ce = F.cross_entropy(logits, targets[rows], reduction="sum")
    return ce, int(rows.numel()), int(tokens.numel())


class _Units:
    """The training units (SFT packs or DPO pairs) and the seeded order they are seen in."""

    def __init__(self, cfg: TrainConfig, data: list[Any]):
        self.cfg = cfg
        if cfg.method == "sft":
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(data), generator=g).tolist()
            shuffled = [data[i] for i in order]
            groups = pack([len(s.tokens) - 1 for s in shuffled], cfg.seq_len)
            self.units: list[list[Any]] = [[shuffled[i] for i in grp] for grp in groups]
        else:
            self.units = [[p] for p in data]
        self.micro_per_epoch = math.ceil(len(self.units) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self._perm: tuple[int, list[int]] | None = None

    def total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return max(1, math.ceil((self.cfg.epochs or 1.0) * self.steps_per_epoch))

    def microbatch(self, g: int) -> list[Any]:
        epoch, k = divmod(g, self.micro_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch + 1)
            self._perm = (epoch, torch.randperm(len(self.units), generator=gen).tolist())
        idx = self._perm[1][k * self.cfg.batch_size : (k + 1) * self.cfg.batch_size]
        return [item for i in idx for item in self.units[i]]


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate for optimizer step ``k`` (0-based): linear warmup
    over ``warmup_fraction`` of the steps, then cosine to 0 (``cosine``), linear to 0
    (``one_cycle``, with a warmup from 0 as in OneCycle), or flat (``constant``)."""
    warm = round(cfg.warmup_fraction * total)

    def f(k: int) -> float:
        if k < warm:
            return (k + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (k - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def prepare(
    cfg: TrainConfig, should_stop: Callable[[], bool] | None = None
) -> tuple[Any, Transformer, list[Any], list[Any]]:
    """Checkpoint, LoRA-wrapped model (seeded init), training and eval data. Data errors
    raise before the model is read (`Stopped` when ``should_stop()`` while validating)."""
    from souverain import weights
    from souverain.models.loader import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = weights.load(cfg.model)
    if ckpt.tokenizer is None:
        raise FinetuneError(
            f"{cfg.model} has no tokenizer; copy its tokenizer file into the model folder."
        )
    train, _ = load_dataset(
        cfg.train_files,
        ckpt.tokenizer,
        method=cfg.method,
        seq_len=cfg.seq_len,
        should_stop=should_stop,
    )
    evals: list[Any] = []
    if cfg.eval_files:
        evals, _ = load_dataset(
            cfg.eval_files,
            ckpt.tokenizer,
            method=cfg.method,
            seq_len=cfg.seq_len,
            should_stop=should_stop,
        )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_model(ckpt, cfg.dtype, fuse=False)
    inject_lora(model, cfg.lora.rank, cfg.lora.scaling, cfg.lora.dropout, cfg.lora.target_modules)
    return ckpt, model, train, evals


@torch.no_grad()
def evaluate(
    model: Transformer,
    cfg: TrainConfig,
    data: list[Any],
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Eval loss over all eval samples (SFT: token-weighted CE on assistant tokens, and
    perplexity = e^loss; DPO: mean pair loss, reward margin and accuracy). Raises `Stopped`
    when ``should_stop()`` (polled before each batch)."""
    was_training = model.training
    model.eval()
    try:
        if cfg.method == "sft":
            total, count = 0.0, 0
            for grp in pack([len(s.tokens) - 1 for s in data], cfg.seq_len):
                _check(should_stop)
                loss_sum, n, _ = sft_loss_sum(model, [data[i] for i in grp])
                total += float(loss_sum)
                count += n
            loss = total / max(1, count)
            return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        losses, margins = [], []
        for i in range(0, len(data), cfg.batch_size):
            _check(should_stop)
            lo, ma = pair_losses(model, data[i : i + cfg.batch_size], cfg.dpo_beta)
            losses.append(lo)
            margins.append(ma)
        lo, ma = torch.cat(losses), torch.cat(margins)
        return {
            "eval_loss": float(lo.mean()),
            "reward_margin": float(ma.mean()),
            "reward_accuracy": float((ma > 0).float().mean()),
        }
    finally:
        model.train(was_training)


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter as ``cfg`` says; see the module docstring for the whole path.
    ``should_stop()`` is polled all along (see the module docstring): when true, the run
    returns with status "cancelled"; during training a checkpoint of the last whole step is
    written first (resume it later with ``resume=True``)."""
    existing = check_run_dir(cfg, Path(cfg.run_dir), resume)
    try:
        run = _Run(cfg, on_event, should_stop)
        if resume and existing:
            step = run.restore(existing[-1])
        else:
            step = 0
            run.evaluate(step)
    except Stopped:  # before the first step: nothing to save
        return TrainResult(Path(cfg.run_dir), 0, {}, "cancelled")
    return run.train(step, should_stop)


class _Run:
    """One run's state: the LoRA-wrapped model, its optimizer and schedule, the data order and
    the events. Built in the order the RNGs are consumed (a resumed run replays it)."""

    def __init__(
        self, cfg: TrainConfig, on_event: EventFn | None, should_stop: Callable[[], bool] | None
    ):
        ckpt, self.model, train_data, self.eval_data = prepare(cfg, should_stop)
        self.should_stop = should_stop
        self.cfg, self.run_dir, self.args = cfg, Path(cfg.run_dir), ckpt.args
        start_run_dir(cfg, self.run_dir)
        self.emit = Emitter(self.run_dir, on_event)
        self.units = _Units(cfg, train_data)
        self.total = self.units.total_steps()
        self.params = [
            p for layer in lora_layers(self.model).values() for p in (layer.lora_A, layer.lora_B)
        ]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=cfg.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total))
        self.history: dict[str, Any] = {}  # the last step's event

    def restore(self, checkpoint: Path) -> int:
        """Adapter, optimizer, scheduler and RNGs as they were at ``checkpoint``; its step."""
        load_into(self.model, load_adapter(checkpoint))
        step = restore_trainer_state(checkpoint, self.opt, self.sched)
        self.emit({"type": "resume", "step": step, "path": str(checkpoint)})
        return step

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate (when there is eval data) and emit the result."""
        if not self.eval_data:
            return {}
        ev = evaluate(self.model, self.cfg, self.eval_data, self.should_stop)
        self.emit({"type": "eval", "step": step, **ev})
        return ev

    def train(self, step: int, should_stop: Callable[[], bool] | None) -> TrainResult:
        """Optimizer steps from ``step`` to the end, with evals and checkpoints on their
        schedules; stopped early (checkpoint written) when ``should_stop()``."""
        cfg = self.cfg
        self.model.train()
        started, first_step = time.monotonic(), step
        while step < self.total:
            if should_stop is not None and should_stop():
                return self._stopped(step)
            t0 = time.monotonic()
            g = step * cfg.grad_accum
            micro = [self.units.microbatch(g + j) for j in range(cfg.grad_accum)]
            lr = self.opt.param_groups[0]["lr"]
            rng = _rng_states() if should_stop is not None else None
            try:
                stats = _train_step(
                    self.model, cfg, micro, self.params, self.opt, self.sched, should_stop
                )
            except Stopped:  # half-way through the step: as if it never began
                self.opt.zero_grad(set_to_none=True)
                _set_rng_states(rng)
                return self._stopped(step)
            step += 1
            now = time.monotonic()
            event = {
                "type": "step",
                "step": step,
                "total_steps": self.total,
                **stats,
                "lr": lr,
                "tokens_per_s": stats["tokens"] / max(now - t0, 1e-9),
                "elapsed_s": now - started,
                "eta_s": (now - started) / (step - first_step) * (self.total - step),
            }
            self.history.update({k: v for k, v in event.items() if k != "type"})
            self.emit(event)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total:
                try:
                    self.evaluate(step)
                except Stopped:
                    return self._stopped(step)
            if step % cfg.checkpoint_every == 0 and step < self.total:
                self.checkpoint(step)
        try:
            return self._finish(step)
        except Stopped:  # during the final evaluation
            return self._stopped(step)

    def save_adapter_to(self, folder: Path) -> None:
        cfg = self.cfg
        save_adapter(
            to_adapter(self.model, base_model=str(cfg.model), name=folder.name),
            folder,
            n_heads=self.args.n_heads,
            n_kv_heads=self.args.n_kv_heads,
            alpha=cfg.lora.alpha
            if cfg.lora.alpha is not None
            else cfg.lora.scaling * cfg.lora.rank,
            dropout=cfg.lora.dropout,
        )

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step_NNNNNN`` (the oldest beyond ``keep_checkpoints`` removed)."""
        state = trainer_state(self.cfg, step, self.total, self.opt, self.sched)

        def fill(tmp: Path) -> None:
            self.save_adapter_to(tmp)
            torch.save(state, tmp / STATE_FILE)

        path = write_dir_atomically(self.run_dir / "checkpoints" / f"step_{step:06d}", fill)
        for old in checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.emit({"type": "checkpoint", "step": step, "path": str(path)})
        return path

    def _stopped(self, step: int) -> TrainResult:
        here = self.run_dir / "checkpoints" / f"step_{step:06d}"
        path = here if (here / STATE_FILE).is_file() else self.checkpoint(step)
        self.emit({"type": "done", "status": "cancelled", "step": step, "path": str(path)})
        return TrainResult(path, step, self.history, "cancelled")

    def _finish(self, step: int) -> TrainResult:
        """The final eval and ``checkpoints/final`` (adapter + metrics.json)."""
        metrics = {
            "steps": step,
            "loss": self.history.get("loss"),
            "train_tokens_per_s": self.history.get("tokens_per_s"),
        }
        metrics.update(self.evaluate(step))

        def fill(tmp: Path) -> None:
            self.save_adapter_to(tmp)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

        final = write_dir_atomically(self.run_dir / "checkpoints" / "final", fill)
        self.emit(
            {"type": "done", "status": "completed", "step": step, "path": str(final), **metrics}
        )
        return TrainResult(final, step, metrics, "completed")


def _train_step(
    model: Transformer,
    cfg: TrainConfig,
    micro: list[list[Any]],
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` microbatches; the loss is normalised over the
    whole step (not per microbatch) so accumulation equals one big batch. Raises `Stopped`
    between microbatches when ``should_stop()`` (the optimizer has not stepped then)."""
    stats: dict[str, float] = {}
    tokens = 0
    if cfg.method == "sft":
        n_trained = sum(s.n_trainable for mb in micro for s in mb)
        total_loss = 0.0
        for j, mb in enumerate(micro):
            if j:
                _check(should_stop)
            loss_sum, _, n_tok = sft_loss_sum(model, mb)
            (loss_sum / max(1, n_trained)).backward()
            total_loss += float(loss_sum.detach())
            tokens += n_tok
        stats["loss"] = total_loss / max(1, n_trained)
        stats["trained_tokens"] = n_trained
    else:
        n_pairs = sum(len(mb) for mb in micro)
        losses, margins = [], []
        for j, mb in enumerate(micro):
            if j:
                _check(should_stop)
            lo, ma = pair_losses(model, mb, cfg.dpo_beta)
            (lo.sum() / n_pairs).backward()
            losses.append(lo.detach())
            margins.append(ma)
            tokens += sum(len(p.chosen.tokens) + len(p.rejected.tokens) - 2 for p in mb)
        lo, ma = torch.cat(losses), torch.cat(margins)
        stats.update(
            loss=float(lo.mean()),
            reward_margin=float(ma.mean()),
            reward_accuracy=float((ma > 0).float().mean()),
        )
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    stats["tokens"] = tokens
    return stats


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Stopped("stopped by should_stop()")


def _rng_states() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_states(states: tuple[Any, Any, torch.Tensor] | None) -> None:
    if states is not None:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def measure_tokens_per_s(
    cfg: TrainConfig, model: Transformer, data: list[Any], steps: int = 2
) -> float:
    """Training throughput on this machine: forward + backward of the first microbatch,
    ``steps`` times after one warm-up (no optimizer step: the model is left unchanged)."""
    units = _Units(cfg, data)
    mb = units.microbatch(0)
    model.train()
    rates = []
    for i in range(steps + 1):
        t0 = time.monotonic()
        if cfg.method == "sft":
            loss, _, n = sft_loss_sum(model, mb)
        else:
            lo, _ = pair_losses(model, mb, cfg.dpo_beta)
            loss = lo.sum()
            n = sum(len(p.chosen.tokens) + len(p.rejected.tokens) - 2 for p in mb)
        loss.backward()
        if i:
            rates.append(n / (time.monotonic() - t0))
    for p in model.parameters():
        p.grad = None
    return float(np.median(rates))
