"""The `souverain` command line: chat, generate, inspect.

Every user-fixable problem (a bad path, a corrupt file, a bad flag value) ends the command with
one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from souverain.errors import SouverainError
from souverain.weights import DEFAULT_MODEL

app = typer.Typer(
    name="souverain",
    help=(
        "Your own La Plateforme: run Mistral-family open-weight models (Mistral, Mixtral, NeMo, "
        "Ministral, Codestral, Llama-architecture) on machines you own.\n\n"
        "MODEL is a bundled alias (smollm2-135m-instruct, the default), a .gguf file, or a "
        "folder in the official consolidated format (params.json + consolidated.safetensors) "
        "or the Hugging Face format (config.json + *.safetensors). Nothing is downloaded."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line
out = Console(highlight=False)

ModelArg = typer.Argument(DEFAULT_MODEL, help="Alias, .gguf file or model folder.",
                          show_default=True)
DtypeOpt = typer.Option("auto", "--dtype",
                        help="Weights dtype: auto (float32 if it fits in RAM), float32, bfloat16.")
MaxTokensOpt = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate.")
TemperatureOpt = typer.Option(0.7, "--temperature", "-t", min=0.0,
                              help="0 = greedy (deterministic); higher = more varied.")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
SeedOpt = typer.Option(None, "--seed", help="Random seed for reproducible sampling.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")
QuantOpt = typer.Option("none", "--quantization", "-q",
                        help="Weight-only quantization of the linears: none, int8 or int4 "
                             "(faster decode on CPU, small accuracy cost).")
KvOpt = typer.Option(None, "--kv-cache-gib", min=0.001,
                     help="KV-cache budget in GiB (default: 25% of free memory, at most 4).")


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


def load_llm(model: str, dtype: str, threads: Optional[int], quantization: str = "none",
             kv_cache_gib: Optional[float] = None) -> Any:
    from souverain.llm import LLM

    with Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("tensors"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(model, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        llm = LLM(model, dtype=dtype, quantization=quantization, threads=threads,
                  progress=progress, kv_cache_gib=kv_cache_gib)
    a = llm.args
    err.print(f"[dim]{llm.checkpoint.path} · {llm.checkpoint.format} · "
              f"{a.n_params / 1e6:.0f}M params · {str(llm.dtype).replace('torch.', '')} · "
              f"{'' if quantization == 'none' else quantization + ' · '}{llm.threads} threads · "
              f"KV {llm.engine.kv_tokens} tokens[/]")
    return llm


def sampling(max_tokens: int, temperature: float, top_p: float, seed: Optional[int]) -> Any:
    from souverain.engine.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def _stats(llm: Any, started: float, first: Optional[float]) -> None:
    o = llm.last_output
    if o is None:
        return
    n = len(o.token_ids)
    end = time.perf_counter()
    decode = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    err.print(f"[dim]{n} tokens · prompt {len(o.prompt_token_ids)} · first token "
              f"{(first or end) - started:.2f}s · decode {decode:.1f} tok/s · "
              f"finish {o.finish_reason}[/]")


def _stream(llm: Any, chunks: Iterator[str]) -> None:
    started, first = time.perf_counter(), None
    for piece in chunks:
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _stats(llm, started, first)


@app.command()
def chat(
    model: str = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="A system prompt."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: Optional[int] = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: Optional[float] = KvOpt,
) -> None:
    """Chat with a model in the terminal; answers stream as they are generated.

    Type a message and press Enter. [bold]/reset[/] forgets the conversation, [bold]/exit[/]
    (or Ctrl-D) quits. Input can also be piped: one message per line.

    Examples:
      souverain chat
      souverain chat ./Mistral-7B-Instruct-v0.3 --dtype bfloat16 --temperature 0
    """
    with user_errors():
        params = sampling(max_tokens, temperature, top_p, seed)
        llm = load_llm(model, dtype, threads, quantization, kv_cache_gib)
        llm._require_tokenizer("chat")
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        interactive = sys.stdin.isatty()
        if interactive:
            err.print("[dim]/reset clears the conversation, /exit quits[/]")
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = history[:1] if system else []
                continue
            history.append({"role": "user", "content": text})
            _stream(llm, llm.stream_chat(history, params))
            history.append({"role": "assistant", "content": llm.last_output.text})


@app.command()
def generate(
    model: str = typer.Argument(..., help="Alias, .gguf file or model folder."),
    prompt: str = typer.Argument(..., help="Text to continue (or the user message with --chat)."),
    chat_mode: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0,
                                      help="0 = greedy (the default here); higher = more varied."),
    top_p: float = TopPOpt,
    seed: Optional[int] = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: Optional[float] = KvOpt,
) -> None:
    """Continue a prompt once and stream the text to stdout (stats go to stderr).

    Examples:
      souverain generate smollm2-135m-instruct "The capital of France is" -n 16
      souverain generate ./mixtral-hf "Once upon" --max-tokens 64 --temperature 0
    """
    with user_errors():
        params = sampling(max_tokens, temperature, top_p, seed)
        llm = load_llm(model, dtype, threads, quantization, kv_cache_gib)
        if chat_mode:
            chunks = llm.stream_chat([{"role": "user", "content": prompt}], params)
        else:
            chunks = llm.stream(prompt, params)
        _stream(llm, chunks)


@app.command()
def inspect(
    model: str = ModelArg,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Describe a model without loading its weights: format, architecture, ModelArgs,
    parameter count, stored dtypes / quantization types, tokenizer and chat template.

    Example:
      souverain inspect model.gguf
    """
    with user_errors():
        from souverain.weights import load

        ckpt = load(model)
        tok = ckpt.tokenizer
        info: dict[str, Any] = {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "architecture": ckpt.args.extra.get("architecture", "transformer"),
            "parameters": ckpt.n_params,
            "dtypes": ckpt.source_dtypes(),
            "args": {k: v for k, v in ckpt.args.to_dict().items()},
            "metadata": {k: v for k, v in ckpt.metadata.items()},
            "tokenizer": None if tok is None else {
                "kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "eos_ids": list(tok.eos_ids),
            },
            "chat_template": None if tok is None else tok.chat_template,
        }
        if as_json:
            out.print_json(json.dumps(info, default=str))
            return
        table = Table(title=str(ckpt.path), show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("format", ckpt.format)
        table.add_row("architecture", str(info["architecture"]))
        table.add_row("parameters", f"{ckpt.n_params:,} ({ckpt.n_params / 1e6:.1f}M)")
        table.add_row("stored dtypes", ", ".join(f"{k}×{v}" for k, v in info["dtypes"].items()))
        for k, v in info["args"].items():
            table.add_row(f"  {k}", json.dumps(v, default=str))
        if tok is None:
            table.add_row("tokenizer", "none (token ids only)")
        else:
            table.add_row("tokenizer", f"{tok.kind} · vocab {tok.vocab_size} · bos {tok.bos_id} · "
                          f"eos {list(tok.eos_ids)}")
        out.print(table)
        if tok is not None and tok.chat_template:
            out.print("[bold]chat template[/]")
            out.print(tok.chat_template, markup=False)
        elif tok is not None:
            out.print("[bold]chat template[/]: built-in Mistral instruct format (mistral-common)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark souverain against llama.cpp and transformers on the same workload, in one run
    (`souverain bench --help` lists the options; llama.cpp needs `pip install llama-cpp-python`).

    Example:
      souverain bench --model smollm2 --threads 2 --quantization none,int4
    """
    from souverain.bench import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
