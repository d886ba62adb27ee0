"""What every command of the `souverain` command line shares: the two consoles, the
`user_errors` rule (a user-fixable problem -> one sentence on stderr, exit code 2), the option
declarations several commands take, and the model-loading progress bar.

Cheap to import (typer, rich, `souverain.errors`): torch and the engine are imported by the
commands that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from souverain.errors import SouverainError
from souverain.weights.registry import DEFAULT_MODEL

PIPED_WIDTH = 100_000
"""The width of a console whose output is not a terminal (and COLUMNS unset): wide enough
that no table cell or line is ever wrapped or cut, so that piped output keeps whole paths."""


class _Console(Console):
    """rich's console, except that output to a pipe or a file is not wrapped at 80 columns
    (rich's default when it finds no terminal, or the width of the terminal that stdin is).
    Tables are as wide as their content; COLUMNS still sets a width."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(PIPED_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


err = _Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line
out = _Console(highlight=False)

ModelArg = typer.Argument(DEFAULT_MODEL, help="Alias, .gguf file or model folder.",
                          show_default=True)
DtypeOpt = typer.Option("auto", "--dtype",
                        help="Weights/activations dtype: auto (float32 if it fits in RAM; "
                             "bfloat16 with --quantization), float32, bfloat16.")
MaxTokensOpt = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate.")
TemperatureOpt = typer.Option(0.7, "--temperature", "-t", min=0.0,
                              help="0 = greedy (deterministic); higher = more varied.")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
SeedOpt = typer.Option(None, "--seed", help="Random seed for reproducible sampling.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")
QuantOpt = typer.Option("none", "--quantization", "-q",
                        help="Quantized linears on the CPU: none, int4 (weight-only; fastest "
                             "single-stream decode) or int8 (int8 weights x 2-plane int8 "
                             "activations; most throughput under concurrent load). Small "
                             "accuracy cost.")
SpeculativeOpt = typer.Option(
    None, "--speculative",
    help="Speculative decoding: ngram (prompt lookup: drafts the tokens that followed the "
         "text's latest suffix earlier in the prompt or answer, checked in the same forward), "
         "or a draft model (alias, .gguf or folder: a smaller model with the same tokenizer, "
         "e.g. a smaller family member). Greedy answers are unchanged and sampled ones keep "
         "their distribution; answers that copy their input "
         "(RAG, extraction, code edits) come several times faster with ngram. Off by default.")
SpecTokensOpt = typer.Option(5, "--num-speculative-tokens", min=1, max=16,
                             help="Most draft tokens per step with --speculative (adapted "
                                  "per request to its acceptance rate).")
TensorParallelOpt = typer.Option(
    1, "--tensor-parallel", min=1, metavar="K",
    help="Split the model's forward over K rank processes (tensor parallelism: each holds "
         "1/K of the attention heads, of the FFN and of every Mixtral expert, quantized "
         "weights included, and the KV cache of its own heads; one all-reduce per block half, "
         "gloo on the CPU). The API and the greedy answers are those of 1. On one machine "
         "it mostly helps a model that does not fit one process's, or one CPU socket's, "
         "memory; each rank gets --threads / K threads. K must divide the model's heads, kv "
         "heads and FFN size; not with --lora-modules. Ranks on several machines: torchrun "
         "with `python -m souverain.distributed` (see its --help).")
KvOpt = typer.Option(None, "--kv-cache-gib", min=0.001,
                     help="KV-cache budget in GiB (default: 25% of free memory, at most 4).")
DataDirOpt = typer.Option(None, "--data-dir",
                          help="Where libraries are kept (default: $SOUVERAIN_HOME or "
                               "~/.local/share/souverain).")
LibraryArg = typer.Argument(..., help="Library name or id (see `souverain library list`).")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one sentence and exit code 2."""
    try:
        yield
    except SouverainError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        err.print(f"[bold red]error:[/] {exc.strerror or exc}: {exc.filename}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def loading_bar() -> Progress:
    """The transient bar shown on stderr while a model's tensors are read
    (one task per model, its total set by the first progress callback)."""
    return Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("tensors"), TimeElapsedColumn(),
                    console=err, transient=True)


def human_bytes(n: float) -> str:
    """``n`` bytes as B / KiB / MiB / GiB, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
