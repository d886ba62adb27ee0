"""The commands that run a model in this process: `chat`, `generate`, `inspect` and `ask`
(a library question answered with citations), with the model loading, sampling and streaming
they share. The engine and torch are imported inside the commands, when a model is loaded.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from souverain.cli.common import (
    DataDirOpt,
    DtypeOpt,
    KvOpt,
    LibraryArg,
    MaxTokensOpt,
    ModelArg,
    QuantOpt,
    SeedOpt,
    SpecTokensOpt,
    SpeculativeOpt,
    TemperatureOpt,
    TensorParallelOpt,
    ThreadsOpt,
    TopPOpt,
    err,
    loading_bar,
    out,
    user_errors,
)
from souverain.cli.library import library_store
from souverain.weights.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from souverain.engine.sampling import SamplingParams
    from souverain.llm import LLM
    from souverain.tokenizer.base import Tokenizer
    from souverain.weights.checkpoint import Checkpoint


def load_llm(model: str, dtype: str, threads: int | None, quantization: str = "none",
             kv_cache_gib: float | None = None, speculative: str | None = None,
             num_speculative_tokens: int = 5, tensor_parallel: int = 1) -> LLM:
    """Load ``model`` with a progress bar on stderr, then print one line describing it
    (``tensor_parallel`` > 1: its rank processes stop when this process exits)."""
    from souverain.llm import LLM

    with loading_bar() as bar:
        task = bar.add_task(model, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        llm = LLM(model, dtype=dtype, quantization=quantization, threads=threads,
                  progress=progress, kv_cache_gib=kv_cache_gib, speculative=speculative,
                  num_speculative_tokens=num_speculative_tokens,
                  tensor_parallel=tensor_parallel)
    a = llm.args
    tp = f"tensor-parallel {tensor_parallel} ranks · " if tensor_parallel > 1 else ""
    err.print(f"[dim]{llm.checkpoint.path} · {llm.checkpoint.format} · "
              f"{a.n_params / 1e6:.0f}M params · {str(llm.dtype).replace('torch.', '')} · "
              f"{'' if quantization == 'none' else quantization + ' · '}{tp}{llm.threads} "
              f"threads · KV {llm.engine.kv_tokens} tokens[/]")
    return llm


def sampling(max_tokens: int, temperature: float, top_p: float,
             seed: int | None) -> SamplingParams:
    from souverain.engine.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def _stats(llm: LLM, started: float, first: float | None) -> None:
    o = llm.last_output
    if o is None:
        return
    n = len(o.token_ids)
    end = time.perf_counter()
    decode = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    err.print(f"[dim]{n} tokens · prompt {len(o.prompt_token_ids)} · first token "
              f"{(first or end) - started:.2f}s · decode {decode:.1f} tok/s · "
              f"finish {o.finish_reason}[/]")


def _stream(llm: LLM, chunks: Iterator[str]) -> str:
    """Write ``chunks`` to stdout as they come, stats to stderr; the generated text."""
    started, first = time.perf_counter(), None
    for piece in chunks:
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _stats(llm, started, first)
    return llm.last_output.text if llm.last_output is not None else ""


def chat(
    model: str = ModelArg,
    system: str | None = typer.Option(None, "--system", "-s", help="A system prompt."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int | None = SeedOpt,
    threads: int | None = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
    speculative: str | None = SpeculativeOpt,
    num_speculative_tokens: int = SpecTokensOpt,
    tensor_parallel: int = TensorParallelOpt,
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
        llm = load_llm(model, dtype, threads, quantization, kv_cache_gib, speculative,
                       num_speculative_tokens, tensor_parallel)
        with llm:
            _chat_loop(llm, system, params)


def _chat_loop(llm: LLM, system: str | None, params: SamplingParams) -> None:
    """`chat`'s conversation: one line in, one streamed answer out, until /exit or EOF."""
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
        reply = _stream(llm, llm.stream_chat(history, params))
        history.append({"role": "assistant", "content": reply})


def generate(
    model: str = typer.Argument(..., help="Alias, .gguf file or model folder."),
    prompt: str = typer.Argument(..., help="Text to continue (or the user message with --chat)."),
    chat_mode: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0,
                                      help="0 = greedy (the default here); higher = more varied."),
    top_p: float = TopPOpt,
    seed: int | None = SeedOpt,
    threads: int | None = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
    speculative: str | None = SpeculativeOpt,
    num_speculative_tokens: int = SpecTokensOpt,
    tensor_parallel: int = TensorParallelOpt,
) -> None:
    """Continue a prompt once and stream the text to stdout (stats go to stderr).

    Examples:
      souverain generate smollm2-135m-instruct "The capital of France is" -n 16
      souverain generate ./mixtral-hf "Once upon" --max-tokens 64 --temperature 0
    """
    with user_errors():
        params = sampling(max_tokens, temperature, top_p, seed)
        with load_llm(model, dtype, threads, quantization, kv_cache_gib, speculative,
                      num_speculative_tokens, tensor_parallel) as llm:
            if chat_mode:
                chunks = llm.stream_chat([{"role": "user", "content": prompt}], params)
            else:
                chunks = llm.stream(prompt, params)
            _stream(llm, chunks)


def _model_info(ckpt: Checkpoint) -> dict[str, Any]:
    """What `inspect` shows of a checkpoint, as one JSON-able dict."""
    tok = ckpt.tokenizer
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": ckpt.args.extra.get("architecture", "transformer"),
        "parameters": ckpt.n_params,
        "dtypes": ckpt.source_dtypes(),
        "args": dict(ckpt.args.to_dict().items()),
        "metadata": dict(ckpt.metadata.items()),
        "tokenizer": None if tok is None else {
            "kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_ids": list(tok.eos_ids),
        },
        "chat_template": None if tok is None else tok.chat_template,
    }


def _print_model_info(ckpt: Checkpoint, info: dict[str, Any]) -> None:
    tok = ckpt.tokenizer
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
        info = _model_info(ckpt)
        if as_json:
            out.print_json(json.dumps(info, default=str))
            return
        _print_model_info(ckpt, info)


def ask(
    library: str = LibraryArg,
    question: str = typer.Argument(..., help="The question, in plain words."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Chat model: alias, .gguf file or model folder."),
    k: int = typer.Option(5, "-k", min=1, max=50, help="Most passages given to the model."),
    data_dir: str | None = DataDirOpt,
    as_json: bool = typer.Option(False, "--json", help="Print answer and references as JSON."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0,
                                      help="0 = greedy (the default here, for factual answers)."),
    threads: int | None = ThreadsOpt,
    quantization: str = QuantOpt,
) -> None:
    """Answer a question from a document library, citing the passages used.

    The library is searched (hybrid vector + BM25), the relevant passages are given to the model
    numbered [1], [2]..., and the answer is followed by its sources (document, page, section).
    When nothing relevant is found, it says so instead of guessing. Nothing leaves this machine.

    Examples:
      souverain ask policies "What is the notice period for a senior engineer?"
      souverain ask policies "Who approves remote work?" -m ./Mistral-7B-Instruct-v0.3 -q int8
    """
    with user_errors():
        from souverain.rag.answer import ground

        g = ground(library_store(data_dir), [library], question, k=k)
        if not g.found:  # said without loading a model
            if as_json:
                out.print_json(data={"answer": g.not_found_text(), "found": False,
                                     "references": []})
            else:
                out.print(g.not_found_text())
            return
        llm = load_llm(model, dtype, threads, quantization)
        tok: Tokenizer = llm._require_tokenizer("chat")
        budget = max(256, llm.context - max_tokens - len(tok.encode(question)) - 64)
        g.fit(budget, lambda s_: len(tok.encode(s_)))
        messages = [{"role": "system", "content": g.system_prompt()},
                    {"role": "user", "content": question}]
        params = sampling(max_tokens, temperature, 1.0, None)
        if as_json:
            answer = "".join(llm.stream_chat(messages, params))
            out.print_json(data={"answer": answer, "found": True,
                                 "references": g.references(answer)})
            return
        answer = _stream(llm, llm.stream_chat(messages, params))
        out.print(g.sources_footer(answer).strip(), highlight=False)
