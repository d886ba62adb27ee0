"""`souverain finetune validate|run|merge|classifier`: LoRA fine-tuning on this machine, in the
foreground (the server's jobs API runs the same training in its worker process). Training,
data checks and merging are imported inside the commands (they load torch).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from souverain.cli.common import ThreadsOpt, err, out, user_errors
from souverain.weights.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from souverain.finetune.data import DataReport

finetune_app = typer.Typer(
    help="Fine-tune a model on your own data, on this machine: LoRA SFT or DPO, checkpoints "
         "that resume exactly, adapters in the PEFT and mistral-finetune formats, merging.\n\n"
         "Data is mistral-finetune JSONL: {\"text\"} (pretrain), {\"messages\": [...]} "
         "(instruct, optional tools), {\"prompt\", \"chosen\", \"rejected\"} (DPO).\n\n"
         "Quick start:\n\n"
         "  souverain finetune validate train.jsonl --model smollm2-135m-instruct\n\n"
         "  souverain finetune run run.yaml            (Ctrl-C checkpoints; --resume goes on)\n\n"
         "  souverain finetune merge runs/zorblax/checkpoints/final --model "
         "smollm2-135m-instruct --out merged/\n\n"
         "  souverain finetune classifier labelled.jsonl --eval held_out.jsonl -o runs/topics"
         "   (classification heads + LoRA on the embedding model)",
    no_args_is_help=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_reports(reports: list[DataReport], seq_len: int) -> None:
    """One table row per file, then every error with its file and line (exit 2 if any)."""
    table = Table("file", "kind", "samples", "tokens", "trained tokens", "errors")
    for r in reports:
        table.add_row(r.path, r.kind or "-", str(r.n_samples), str(r.n_tokens),
                      str(r.n_trainable_tokens), str(len(r.errors)))
    out.print(table)
    for r in reports:
        if r.n_split:
            out.print(f"{r.path}: {r.n_split} long text(s) split into {seq_len}-token pieces")
    bad = [r for r in reports if not r.ok]
    if bad:
        for r in bad:
            for e in r.errors:
                err.print(f"{r.path}:{e.line}: {e.message}" if e.line else
                          f"{r.path}: {e.message}")
        raise typer.Exit(2)


def _print_epoch_estimate(model: str, files: list[str], method: str, seq_len: int,
                          threads: int | None, total_tokens: int) -> None:
    """Time two training steps on this machine (loads the model) and extrapolate one epoch."""
    from souverain.finetune.config import TrainConfig
    from souverain.finetune.train import measure_tokens_per_s, prepare

    cfg = TrainConfig(model=model, train_files=files, run_dir=".", method=method,  # type: ignore[arg-type]
                      seq_len=seq_len, threads=threads)
    _, lm, data, _ = prepare(cfg)
    tps = measure_tokens_per_s(cfg, lm, data)
    out.print(f"estimated time per epoch on this machine: {_duration(total_tokens / tps)} "
              f"({tps:,.0f} training tokens/s measured over 2 forward+backward passes "
              f"of one {seq_len}-token batch, float32, LoRA rank 16)")


@finetune_app.command("validate")
def finetune_validate(
    files: list[str] = typer.Argument(..., help="JSONL file(s) to check."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="The base model (its tokenizer and chat format are used)."),
    method: str = typer.Option("sft", "--method", help="sft or dpo (preference pairs)."),
    seq_len: int = typer.Option(512, "--seq-len", min=8,
                                help="Longest sample in tokens (longer ones are errors)."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate",
                                  help="Time a few training steps on this machine to estimate "
                                       "the time of one epoch (loads the model)."),
    threads: int | None = ThreadsOpt,
) -> None:
    """Check training data: every bad line with its number and the fix (exit 2 if any),
    sample and token counts, and an estimated time per epoch on this machine.

    Example: souverain finetune validate train.jsonl --model smollm2-135m-instruct --seq-len 1024
    """
    with user_errors():
        from souverain import weights
        from souverain.errors import FinetuneError
        from souverain.finetune.data import ChatRenderer, validate_file

        if method not in ("sft", "dpo"):
            raise FinetuneError(f"--method {method!r} is unknown; use sft or dpo.")
        ckpt = weights.load(model)
        if ckpt.tokenizer is None:
            raise FinetuneError(f"{model} has no tokenizer; copy its tokenizer file beside it.")
        renderer = ChatRenderer(ckpt.tokenizer)
        reports = [validate_file(f, ckpt.tokenizer, method=method,  # type: ignore[arg-type]
                                 seq_len=seq_len, renderer=renderer) for f in files]
        _print_reports(reports, seq_len)
        if estimate:
            _print_epoch_estimate(model, files, method, seq_len, threads,
                                  sum(r.n_tokens for r in reports))


@contextlib.contextmanager
def _stop_on_first_sigint() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C asks training to stop after its step (a checkpoint is written);
    the second one interrupts at once. Yields the flag ``{"asked": bool}``."""
    stop = {"asked": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        err.print("stopping after this step (a checkpoint is written); Ctrl-C again to "
                  "quit at once")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _show_event(bar: Progress, task: TaskID, e: dict[str, Any]) -> None:
    """One training event on the step bar (steps) or above it (eval, checkpoint, resume)."""
    if e["type"] == "step":
        extra = f" margin {e['reward_margin']:.3f}" if "reward_margin" in e else ""
        bar.update(task, completed=e["step"], total=e["total_steps"],
                   info=f"loss {e['loss']:.4f}{extra} · lr {e['lr']:.2e} · "
                        f"{e['tokens_per_s']:,.0f} tok/s · ETA {_duration(e['eta_s'])}")
    elif e["type"] == "eval":
        ppl = f" (perplexity {e['perplexity']:.2f})" if "perplexity" in e else ""
        bar.console.print(f"step {e['step']}: eval loss {e['eval_loss']:.4f}{ppl}")
    elif e["type"] == "checkpoint":
        bar.console.print(f"[dim]checkpoint {e['path']}[/]")
    elif e["type"] == "resume":
        bar.console.print(f"resumed from {e['path']}")


@finetune_app.command("run")
def finetune_run(
    config: str = typer.Argument(..., help="YAML config (ours or mistral-finetune's keys)."),
    resume: bool = typer.Option(False, "--resume",
                                help="Go on from the last checkpoint in run_dir, exactly."),
) -> None:
    """Train a LoRA adapter (SFT or DPO) as CONFIG says; the adapter lands in
    run_dir/checkpoints/final (PEFT + mistral-finetune formats), metrics in run_dir/metrics.jsonl.
    Ctrl-C writes a checkpoint first; --resume continues bit for bit.

    Example run.yaml:

      model: smollm2-135m-instruct
      train_files: [train.jsonl]
      eval_files: [eval.jsonl]
      run_dir: runs/zorblax
      seq_len: 256
      max_steps: 60
      learning_rate: 1.0e-3
      lora: {rank: 8}
      checkpoint_every: 20

    mistral-finetune keys also work (data.instruct_data, optim.lr, num_microbatches, ckpt_freq...).
    """
    with user_errors():
        from souverain.finetune.config import TrainConfig
        from souverain.finetune.train import run_training

        cfg = TrainConfig.from_yaml(config)
        columns = (TextColumn("[bold]step[/] {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("{task.fields[info]}"))
        with _stop_on_first_sigint() as stop, \
                Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("train", total=None, info="loading data and model")
            result = run_training(cfg, resume=resume,
                                  on_event=lambda e: _show_event(bar, task, e),
                                  should_stop=lambda: stop["asked"])
        if result.status == "cancelled":
            err.print(f"stopped at step {result.steps}; checkpoint {result.final_dir}. Go on "
                      f"with: souverain finetune run {config} --resume")
            raise typer.Exit(130)
        out.print(f"adapter: {result.final_dir} ({result.steps} steps"
                  + (f", eval loss {result.metrics['eval_loss']:.4f}"
                     if "eval_loss" in result.metrics else "") + ")")


@finetune_app.command("merge")
def finetune_merge(
    adapter: str = typer.Argument(..., help="Adapter folder (e.g. runs/NAME/checkpoints/final)."),
    model: str = typer.Option(..., "--model", "-m", help="The base model it was trained on."),
    out_dir: str = typer.Option(..., "--out", "-o", help="New folder for the merged model."),
    fmt: str = typer.Option("consolidated", "--format",
                            help="consolidated (params.json + consolidated.safetensors) or hf "
                                 "(config.json + model.safetensors, loads in transformers)."),
) -> None:
    """Fold an adapter into its base model (W + scaling * B @ A) as a full model folder.

    Example: souverain finetune merge runs/zorblax/checkpoints/final -m smollm2-135m-instruct
    --out zorblax-model --format hf
    """
    with user_errors():
        from souverain.finetune.merge import merge_adapter

        path = merge_adapter(model, adapter, out_dir, format=fmt)  # type: ignore[arg-type]
        out.print(f"merged model written to {path}; serve it with `souverain serve {path}`")


@finetune_app.command("classifier")
def finetune_classifier(
    train_files: list[str] = typer.Argument(..., help="Classifier JSONL file(s): "
                                            "{\"text\" or \"messages\", \"labels\": {...}}."),
    run_dir: str = typer.Option(..., "--run-dir", "-o",
                                help="Run folder; the model lands in run_dir/checkpoints/final."),
    eval_files: list[str] = typer.Option([], "--eval", help="Held-out JSONL file(s)."),
    base: str = typer.Option("souverain-embed", "--base",
                             help="souverain-embed (bundled, fast), a sentence-transformers "
                                  "folder, or a chat model souverain loads (mean hidden state)."),
    epochs: float = typer.Option(3.0, "--epochs", min=0.01),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Train this many steps "
                                                                  "instead of --epochs."),
    learning_rate: float = typer.Option(1e-3, "--lr", min=1e-8),
    lora_rank: int = typer.Option(16, "--lora-rank", min=0, help="0: train the heads only."),
    resume: bool = typer.Option(False, "--resume",
                                help="Go on from the last checkpoint in --run-dir."),
) -> None:
    """Train a text classifier (heads + LoRA) on the embedding model or a chat model.

    One head per target (single-label: softmax; multi-label: a sigmoid per label), as a
    `job_type: "classifier"` job of the server trains it. Targets and labels come from the
    files; every bad line is listed with its number. The model lands in
    run_dir/checkpoints/final (ClassifierModel.load reads it).
    """
    with user_errors():
        from souverain.errors import FinetuneError
        from souverain.finetune import classifier_data as cd
        from souverain.finetune.classifier import base_tokenizer
        from souverain.finetune.classifier_train import (
            ClassifierTrainConfig,
            run_classifier_training,
        )

        targets = cd.infer_targets(train_files)
        problem = cd.check_targets(targets)
        count, window = base_tokenizer(base)
        problems = [f"{p} line {e.line}: {e.message}" if e.line else f"{p}: {e.message}"
                    for p in [*train_files, *eval_files]
                    for e in cd.validate_classifier_file(p, targets, count_tokens=count,
                                                         max_tokens=window).errors]
        if problem or problems:
            for line in problems[:50]:
                err.print(line)
            raise FinetuneError(problem or f"{len(problems)} problem(s) in the data; fix the "
                                           "lines above")
        for t in targets:
            out.print(f"target {t.name} ({t.loss_function}): {', '.join(t.labels)}")
        cfg = ClassifierTrainConfig(model=base, train_files=list(train_files), run_dir=run_dir,
                                    targets=[t.to_dict() for t in targets],
                                    eval_files=list(eval_files), max_steps=steps,
                                    epochs=epochs, learning_rate=learning_rate,
                                    lora_rank=lora_rank)
        columns = (TextColumn("[bold]step[/] {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("{task.fields[info]}"))

        def show(e: dict[str, Any]) -> None:
            if e["type"] == "step":
                bar.update(task, completed=e["step"], total=e["total_steps"],
                           info=f"loss {e['loss']:.4f} · lr {e['lr']:.2e}")
            elif e["type"] == "eval":
                bar.console.print(f"step {e['step']}: eval loss {e['eval_loss']:.4f}, "
                                  f"accuracy {e['eval_accuracy']:.3f}")

        with _stop_on_first_sigint() as stop, \
                Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("train", total=None, info="loading the model")
            result = run_classifier_training(cfg, resume=resume, on_event=show,
                                             should_stop=lambda: stop["asked"])
        if result.status == "cancelled":
            err.print(f"stopped at step {result.steps}; go on with --resume.")
            raise typer.Exit(130)
        acc = result.metrics.get("eval_accuracy")
        out.print(f"classifier: {result.final_dir} ({result.steps} steps"
                  + (f", held-out accuracy {acc:.3f}" if acc is not None else "") + ")")
