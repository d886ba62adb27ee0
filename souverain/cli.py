"""The `souverain` command line: serve, keys, chat, generate, inspect, bench, library.

Every user-fixable problem (a bad path, a corrupt file, a bad flag value) ends the command with
one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def load_llm(model: str, dtype: str, threads: int | None, quantization: str = "none",
             kv_cache_gib: float | None = None) -> Any:
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


def sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> Any:
    from souverain.engine.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def _stats(llm: Any, started: float, first: float | None) -> None:
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
    system: str | None = typer.Option(None, "--system", "-s", help="A system prompt."),
    dtype: str = DtypeOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int | None = SeedOpt,
    threads: int | None = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
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
    seed: int | None = SeedOpt,
    threads: int | None = ThreadsOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
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


def _audit_log(on: bool, path: str | None, content: bool, data_dir: str | None) -> Any:
    from souverain.audit import AuditLog
    from souverain.paths import audit_dir

    if not on:
        return None
    try:
        if path:
            return AuditLog(path=path, content=content)
        return AuditLog(audit_dir(Path(data_dir).expanduser() if data_dir else None),
                        content=content)
    except OSError as exc:
        raise SouverainError(f"Cannot open the audit log ({exc.strerror}: {exc.filename}); "
                             "give a writable --audit-log PATH or --data-dir, or --no-audit."
                             ) from None


def _default_name(model: str) -> str:
    from pathlib import Path

    p = Path(model)
    if not p.exists():
        return model  # an alias
    return p.stem if p.is_file() else p.name


@app.command()
def serve(
    model: str = ModelArg,
    name: str | None = typer.Option(
        None, "--name", help="Model id clients send (default: the alias, file stem or folder "
                             "name), e.g. mistral-small-latest."),
    more_models: list[str] = typer.Option(
        [], "--model", "-m", help="Serve another model too: NAME=PATH (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="Port."),
    api_keys_file: str | None = typer.Option(
        None, "--api-keys-file", help="Keys file made by `souverain keys add` (hashes only). "
                                      "Without it only clients on this machine are answered."),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Answer any client without a key (trusted networks "
                                          "only)."),
    lazy: bool = typer.Option(False, "--lazy/--eager",
                              help="Load models on their first request, or all at start-up."),
    memory_budget_gib: float | None = typer.Option(
        None, "--memory-budget-gib", min=0.01,
        help="Most memory all loaded models (weights + KV) may hold; idle models are unloaded "
             "to make room for a lazy one."),
    max_pending: int = typer.Option(256, "--max-pending", min=1,
                                    help="Requests running or queued at once; more get 429."),
    max_request_mib: float = typer.Option(4.0, "--max-request-mib", min=0.001,
                                          help="Largest request body accepted (413 above)."),
    max_upload_mib: float = typer.Option(
        100.0, "--max-upload-mib", min=0.001,
        help="Largest document upload to a library (413 above)."),
    data_dir: str | None = typer.Option(
        None, "--data-dir", help="Where document libraries (and the audit log) are kept "
                                 "(default: $SOUVERAIN_HOME or ~/.local/share/souverain)."),
    libraries: bool = typer.Option(
        True, "--libraries/--no-libraries",
        help="Serve the Libraries API and the document_library chat tool."),
    finetune: bool = typer.Option(
        True, "--finetune/--no-finetune",
        help="Serve /v1/files and /v1/fine_tuning/jobs, with a training worker process "
             "started and stopped with the server."),
    jobs_db: str | None = typer.Option(
        None, "--jobs-db", help="Fine-tuning jobs database: sqlite:///PATH (default: "
                                "DATA_DIR/finetune/jobs.sqlite) or "
                                "postgresql+psycopg://USER:PASS@HOST/DB."),
    max_file_mib: float = typer.Option(
        512.0, "--max-file-mib", min=0.001, help="Largest POST /v1/files upload (413 above)."),
    finetune_threads: int = typer.Option(
        1, "--finetune-threads", min=0,
        help="CPU threads the training worker uses (0 = all cores; 1 leaves the rest to "
             "serving)."),
    embed_model: str = typer.Option(
        "souverain-embed", "--embed-model",
        help="Model of POST /v1/embeddings (served as souverain-embed, alias mistral-embed): "
             "the bundled all-MiniLM-L6-v2, a sentence-transformers folder, or none."),
    audit: bool = typer.Option(
        True, "--audit/--no-audit",
        help="Append one JSON line per API call (time, key id, route, model, status, tokens, "
             "latency) to DATA_DIR/audit/audit-YYYY-MM-DD.jsonl."),
    audit_log: str | None = typer.Option(
        None, "--audit-log", help="Write the audit log to this one file instead."),
    audit_content: bool = typer.Option(
        False, "--audit-content",
        help="Also log request bodies and generated text, with e-mails, phones, IBANs, card "
             "numbers and IP addresses redacted."),
    rate_limit_rpm: float | None = typer.Option(
        None, "--rate-limit-rpm", min=0.001, help="Requests per minute per API key (429)."),
    rate_limit_tpm: float | None = typer.Option(
        None, "--rate-limit-tpm", min=1, help="Tokens (prompt + completion) per minute per key."),
    default_temperature: float = typer.Option(
        0.7, "--default-temperature", min=0.0, help="Temperature when a request gives none."),
    dtype: str = DtypeOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
    threads: int | None = ThreadsOpt,
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", min=16, help="Context served per sequence (default: the "
                                              "model's, bounded by the KV budget)."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", min=1,
                                     help="Sequences decoded together in one batch."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Serve La Plateforme's HTTP API (chat completions, FIM, models, metrics) on this machine.

    The official SDKs work unchanged with only the URL changed:
      Mistral(api_key=KEY, server_url="http://127.0.0.1:8000")
      OpenAI(api_key=KEY, base_url="http://127.0.0.1:8000/v1")

    Examples:
      souverain serve                                   # bundled model on 127.0.0.1:8000
      souverain keys add keys.txt alice                 # prints a new key once, stores its hash
      souverain serve /models/Mistral-7B-Instruct-v0.3 --name mistral-small-latest \\
          --api-keys-file keys.txt --host 0.0.0.0 --quantization int8
      souverain serve --model codestral=/models/codestral.gguf --lazy --memory-budget-gib 12
    """
    import logging

    with user_errors():
        import uvicorn

        from souverain.engine.engine import EngineConfig
        from souverain.server.app import ServerConfig, create_app
        from souverain.server.auth import APIKeys, is_loopback
        from souverain.server.registry import ModelRegistry, ServedModel

        def engine_config() -> EngineConfig:
            return EngineConfig(dtype=dtype, quantization=quantization, threads=threads,
                                kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                                max_num_seqs=max_num_seqs)

        served = [ServedModel(name or _default_name(model), model, engine_config())]
        for spec in more_models:
            n, sep, path = spec.partition("=")
            if not sep or not n or not path:
                raise typer.BadParameter(f"--model {spec!r} must be NAME=PATH")
            served.append(ServedModel(n, path, engine_config()))
        registry = ModelRegistry(served, memory_budget_gib)
        keys = APIKeys.from_file(api_keys_file) if api_keys_file else None
        config = ServerConfig(api_keys=keys, insecure_no_auth=insecure_no_auth,
                              max_pending=max_pending,
                              max_request_bytes=int(max_request_mib * (1 << 20)),
                              rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm,
                              default_temperature=default_temperature,
                              data_dir=Path(data_dir).expanduser() if data_dir else None,
                              libraries=libraries,
                              max_upload_bytes=int(max_upload_mib * (1 << 20)),
                              embed_model=None if embed_model.lower() == "none" else embed_model,
                              audit=_audit_log(audit, audit_log, audit_content, data_dir),
                              finetune=finetune, jobs_db=jobs_db,
                              max_file_bytes=int(max_file_mib * (1 << 20)),
                              finetune_threads=finetune_threads or None)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not lazy:
            for m in served:
                with Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(),
                              MofNCompleteColumn(), TextColumn("tensors"), TimeElapsedColumn(),
                              console=err, transient=True) as bar:
                    task = bar.add_task(f"{m.name} ({m.model})", total=None)
                    registry.load_now(m, progress=lambda d, t: bar.update(task, completed=d,
                                                                           total=t))
        app_ = create_app(registry, config)
        auth = (f"{len(keys)} API key(s) from {api_keys_file}" if keys is not None
                else "no auth (--insecure-no-auth)" if insecure_no_auth
                else "no API keys: loopback clients only")
        err.print(f"[bold]souverain[/] serving {', '.join(m.name for m in served)} on "
                  f"http://{host}:{port} · {auth}")
        err.print(f"[dim]audit log: {config.audit.describe() if config.audit else 'off'}[/]")
        if keys is None and not insecure_no_auth and not is_loopback(host):
            err.print("[yellow]warning:[/] listening beyond loopback without API keys: remote "
                      "clients get 403 until you pass --api-keys-file.")
        import signal

        # uvicorn drains on SIGTERM, then re-raises it: make that re-raise a clean exit (0),
        # not a death by signal (-15).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        uvicorn.run(app_, host=host, port=port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=30)


DataDirOpt = typer.Option(None, "--data-dir",
                          help="Where libraries are kept (default: $SOUVERAIN_HOME or "
                               "~/.local/share/souverain).")
LibraryArg = typer.Argument(..., help="Library name or id (see `souverain library list`).")


def _library_store(data_dir: str | None) -> Any:
    from souverain.paths import libraries_dir
    from souverain.rag.store import LibraryStore

    return LibraryStore(libraries_dir(Path(data_dir).expanduser() if data_dir else None))


@app.command()
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

        g = ground(_library_store(data_dir), [library], question, k=k)
        if not g.found:  # said without loading a model
            if as_json:
                out.print_json(data={"answer": g.not_found_text(), "found": False,
                                     "references": []})
            else:
                out.print(g.not_found_text())
            return
        llm = load_llm(model, dtype, threads, quantization)
        llm._require_tokenizer("chat")
        tok = llm.tokenizer
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
        _stream(llm, llm.stream_chat(messages, params))
        out.print(g.sources_footer(llm.last_output.text).strip(), highlight=False)


keys_app = typer.Typer(help="Manage the API keys file of `souverain serve` (only hashes are "
                            "stored; a key is shown once, when it is made).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    file: str = typer.Argument(..., help="Keys file (created with mode 0600 if missing)."),
    key_name: str = typer.Argument(..., help="Who or what the key is for, e.g. alice."),
    models: str | None = typer.Option(None, "--models",
                                         help="Comma-separated model ids it may use (all if unset)."),
) -> None:
    """Make a new API key: prints it once; the file keeps only its SHA-256 hash.

    Example: souverain keys add keys.txt alice --models mistral-small-latest
    """
    with user_errors():
        from souverain.server.auth import add_key

        key_id, key = add_key(file, key_name, models.split(",") if models else None)
        err.print(f"key id {key_id} for {key_name} added to {file}; the key (shown only now):")
        out.print(key)


@keys_app.command("revoke")
def keys_revoke(
    file: str = typer.Argument(..., help="Keys file."),
    key: str = typer.Argument(..., help="Key id or name to revoke."),
) -> None:
    """Revoke a key (by id or name); a running server stops accepting it within a second."""
    with user_errors():
        from souverain.server.auth import revoke_key

        if not revoke_key(file, key):
            err.print(f"[bold red]error:[/] no key with id or name {key!r} in {file}.")
            raise typer.Exit(2)
        err.print(f"revoked {key}")


@keys_app.command("list")
def keys_list(file: str = typer.Argument(..., help="Keys file.")) -> None:
    """List key ids, names and allowed models (never the keys: they are not stored)."""
    with user_errors():
        from souverain.server.auth import APIKeys

        for k in APIKeys.from_file(file).keys():
            models = ",".join(sorted(k.models)) if k.models else "all models"
            out.print(f"{k.key_id}  {k.name}  {models}")


library_app = typer.Typer(
    help="Document libraries on this machine: add files and folders (txt, md, html, pdf, docx), "
         "search them, and ground answers in them (`souverain ask`, the server's Libraries API "
         "and its document_library tool use the same libraries).\n\n"
         "Quick start:\n\n"
         "  souverain library create policies\n\n"
         "  souverain library add policies ./hr-handbook ./contracts/2024.pdf --tag hr\n\n"
         "  souverain library search policies \"notice period for managers\"",
    no_args_is_help=True)
app.add_typer(library_app, name="library")

def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@library_app.command("create")
def library_create(
    name: str = typer.Argument(..., help="A name unique on this machine, e.g. policies."),
    description: str | None = typer.Option(None, "--description", "-d",
                                              help="What the library holds (shown in lists)."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """Create an empty library; then add documents with `souverain library add NAME PATH...`."""
    with user_errors():
        lib = _library_store(data_dir).create_library(name, description)
        err.print(f"created library {lib.name} ({lib.id}); add documents with "
                  f"`souverain library add {lib.name} PATH...`")


@library_app.command("list")
def library_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """List the libraries: name, id, documents, total size, description."""
    with user_errors():
        libs = _library_store(data_dir).list_libraries()
        if as_json:
            out.print_json(data=[{"id": x.id, "name": x.name, "description": x.description,
                                  "nb_documents": x.nb_documents, "total_size": x.total_size,
                                  "created_at": x.created_at.isoformat(),
                                  "updated_at": x.updated_at.isoformat()} for x in libs])
            return
        if not libs:
            err.print("no libraries yet; create one with `souverain library create NAME`")
            return
        table = Table("name", "id", "documents", "size", "description", title_justify="left")
        for x in libs:
            table.add_row(x.name, x.id, str(x.nb_documents), _size(x.total_size),
                          x.description or "")
        out.print(table)


@library_app.command("add")
def library_add(
    library: str = LibraryArg,
    paths: list[Path] = typer.Argument(..., help="Files and folders (walked recursively; "
                                                 "hidden files skipped)."),
    tag: list[str] = typer.Option([], "--tag", "-t",
                                  help="Tag the documents (repeatable); search can filter on it."),
    max_mib: float = typer.Option(100.0, "--max-mib", min=0.001,
                                  help="Skip (and report) files larger than this."),
    allowed_root: list[Path] = typer.Option(
        [], "--allowed-root",
        help="Refuse any path (after resolving symlinks) outside these folders (repeatable). "
             "Default: $SOUVERAIN_ALLOWED_ROOTS (':'-separated) if set, else no restriction."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """Add files and folders to a library (parsed, cut, embedded and indexed locally).

    Resumable: files already added with the same content are skipped, so after Ctrl-C just run
    the same command again. A file whose content changed replaces its previous version. Files
    that cannot be read (corrupt, scanned PDF without text, too large) are listed at the end
    and the exit code is 1; the others are added.

    Examples:
      souverain library add policies ./hr-handbook --tag hr
      souverain library add policies contract.pdf notes.md
    """
    with user_errors():
        from souverain.rag.ingest import ingest_paths

        store = _library_store(data_dir)
        store.get_library(library)  # an unknown library fails before the bar appears
        with Progress(TextColumn("[bold]adding[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("files · {task.description}"), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("", total=None)

            def progress(done: int, total: int, path: Path | None) -> None:
                bar.update(task, completed=done, total=total,
                           description=path.name if path else "indexing")

            roots = list(allowed_root) or [
                Path(p) for p in os.environ.get("SOUVERAIN_ALLOWED_ROOTS", "").split(":") if p]
            report = ingest_paths(store, library, paths, tags=tag, progress=progress,
                                  allowed_roots=roots or None,
                                  max_bytes=int(max_mib * (1 << 20)))
        for path, why in report.failed:
            err.print(f"[yellow]skipped[/] {why if str(path.name) in why else f'{path}: {why}'}")
        err.print(f"{library}: {report.summary()}")
        if report.failed:
            raise typer.Exit(1)


@library_app.command("search")
def library_search(
    library: str = LibraryArg,
    query: str = typer.Argument(..., help="What to look for, in plain words."),
    k: int = typer.Option(5, "-k", min=1, max=100, help="Number of passages."),
    mode: str = typer.Option("hybrid", "--mode",
                             help="hybrid (meaning + exact words, the default), vector "
                                  "(meaning only) or text (BM25 words only)."),
    tag: list[str] = typer.Option([], "--tag", "-t",
                                  help="Only documents with one of these tags (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """Find the passages of a library that best match a query.

    Prints rank, score, document, page / section and a snippet. `similarity` is the cosine of
    query and passage: below ~0.3 the passage is probably unrelated.

    Example:
      souverain library search policies "notice period for managers" -k 3
    """
    with user_errors():
        hits = _library_store(data_dir).search([library], query, k=k, tags=tag or None,
                                               mode=mode)  # type: ignore[arg-type]
        if as_json:
            out.print_json(data=[{"rank": i + 1, "score": h.score, "similarity": h.vector_score,
                                  "bm25": h.text_score, "document_id": h.document_id,
                                  "document": h.document_name, "page": h.page,
                                  "heading": h.heading, "start": h.start, "end": h.end,
                                  "chunk_id": h.chunk_id, "text": h.text}
                                 for i, h in enumerate(hits)])
            return
        if not hits:
            err.print(f"nothing found in {library}")
            return
        for i, h in enumerate(hits):
            where = " · ".join(x for x in (f"page {h.page}" if h.page else "",
                                           f"§ {h.heading}" if h.heading else "") if x)
            snippet = " ".join(h.text.split())
            snippet = snippet if len(snippet) <= 300 else snippet[:297] + "..."
            out.print(f"[bold]{i + 1}.[/] {h.score:.3f} (similarity {h.vector_score:.2f})  "
                      f"[bold]{h.document_name}[/]{'  ' + where if where else ''}",
                      markup=True, highlight=False)
            out.print(f"   {snippet}", markup=False)


@library_app.command("docs")
def library_docs(
    library: str = LibraryArg,
    search: str | None = typer.Option(None, "--search", "-s",
                                         help="Only names containing this."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """List a library's documents: id, name, status, pages, passages, size, error."""
    with user_errors():
        store = _library_store(data_dir)
        docs, total = store.list_documents(library, search=search, limit=1_000_000)
        if as_json:
            out.print_json(data=[{"id": d.id, "name": d.name, "status": d.status,
                                  "error": d.error, "mime_type": d.mime_type, "size": d.size,
                                  "hash": d.hash, "number_of_pages": d.number_of_pages,
                                  "nb_chunks": d.nb_chunks,
                                  "tokens_processing_total": d.tokens_processing_total,
                                  "tags": d.tags, "source_path": d.source_path,
                                  "created_at": d.created_at.isoformat()} for d in docs])
            return
        table = Table("name", "id", "status", "pages", "passages", "size", "tags",
                      title=f"{total} documents", title_justify="left")
        for d in docs:
            status = d.status if d.status != "error" else f"[red]error[/]: {d.error}"
            table.add_row(d.name, d.id, status, str(d.number_of_pages or ""), str(d.nb_chunks),
                          _size(d.size), ",".join(d.tags))
        out.print(table)


@library_app.command("remove")
def library_remove(
    library: str = LibraryArg,
    document: str = typer.Argument(..., help="Document id or name (see `souverain library "
                                             "docs`)."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """Remove one document (its passages and stored copy) from a library."""
    with user_errors():
        store = _library_store(data_dir)
        doc = store.get_document(library, document)
        store.delete_document(doc.library_id, doc.id)
        err.print(f"removed {doc.name} ({doc.id})")


@library_app.command("delete")
def library_delete(
    library: str = LibraryArg,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    data_dir: str | None = DataDirOpt,
) -> None:
    """Delete a library with all its documents and passages (asks first unless --yes)."""
    with user_errors():
        store = _library_store(data_dir)
        lib = store.get_library(library)
        if not yes and not typer.confirm(f"Delete library {lib.name} and its "
                                         f"{lib.nb_documents} documents?"):
            raise typer.Exit(1)
        store.delete_library(lib.id)
        err.print(f"deleted library {lib.name}")


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


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    api_keys_file: str | None = typer.Option(
        None, "--api-keys-file", help="Also check the keys file `souverain serve` will use."),
) -> None:
    """Prove where data goes: every way this installation could reach the network and its
    state (none by default), the folders it writes with their sizes, and versions.

    Exit code 0 when nothing can send data out, 1 when something could (each finding says
    how to turn it off).
    """
    from souverain.doctor import human_bytes, report

    r = report(api_keys_file)
    if as_json:
        out.print_json(json.dumps(r))
        raise typer.Exit(1 if r["egress"] else 0)
    table = Table(title="network egress", title_justify="left")
    for col in ("path out", "state", ""):
        table.add_column(col)
    for f in r["findings"]:
        table.add_row(f["name"], f["state"], "[red]EGRESS[/]" if f["egress"] else "[green]ok[/]",
                      style=None if not f["egress"] else "bold")
    out.print(table)
    table = Table(title="data on this machine", title_justify="left")
    for col in ("what", "path", "use", "size"):
        table.add_column(col)
    for d in r["data"]:
        table.add_row(d["name"], d["path"], d["use"],
                      human_bytes(d["bytes"]) if d["exists"] else "absent")
    out.print(table)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()
                                       if k != "platform"), markup=False)
    bad = [f for f in r["findings"] if f["egress"]]
    for f in bad:
        err.print(f"[bold red]egress:[/] {f['name']}: {f['state']}. {f['fix']}")
    if not bad:
        out.print("[green]No egress: nothing in this installation sends data off this machine.[/]")
    raise typer.Exit(1 if bad else 0)


finetune_app = typer.Typer(
    help="Fine-tune a model on your own data, on this machine: LoRA SFT or DPO, checkpoints "
         "that resume exactly, adapters in the PEFT and mistral-finetune formats, merging.\n\n"
         "Data is mistral-finetune JSONL: {\"text\"} (pretrain), {\"messages\": [...]} "
         "(instruct, optional tools), {\"prompt\", \"chosen\", \"rejected\"} (DPO).\n\n"
         "Quick start:\n\n"
         "  souverain finetune validate train.jsonl --model smollm2-135m-instruct\n\n"
         "  souverain finetune run run.yaml            (Ctrl-C checkpoints; --resume goes on)\n\n"
         "  souverain finetune merge runs/zorblax/checkpoints/final --model "
         "smollm2-135m-instruct --out merged/",
    no_args_is_help=True)
app.add_typer(finetune_app, name="finetune")


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
        if estimate:
            from souverain.finetune.config import TrainConfig
            from souverain.finetune.train import measure_tokens_per_s, prepare

            cfg = TrainConfig(model=model, train_files=files, run_dir=".", method=method,  # type: ignore[arg-type]
                              seq_len=seq_len, threads=threads)
            _, lm, data, _ = prepare(cfg)
            tps = measure_tokens_per_s(cfg, lm, data)
            total = sum(r.n_tokens for r in reports)
            out.print(f"estimated time per epoch on this machine: {_duration(total / tps)} "
                      f"({tps:,.0f} training tokens/s measured over 2 forward+backward passes "
                      f"of one {seq_len}-token batch, float32, LoRA rank 16)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
    import signal

    with user_errors():
        from souverain.finetune.config import TrainConfig
        from souverain.finetune.train import run_training

        cfg = TrainConfig.from_yaml(config)
        stop = {"asked": False}

        def on_sigint(signum: int, frame: Any) -> None:
            if stop["asked"]:
                raise KeyboardInterrupt
            stop["asked"] = True
            err.print("stopping after this step (a checkpoint is written); Ctrl-C again to "
                      "quit at once")

        previous = signal.signal(signal.SIGINT, on_sigint)
        columns = (TextColumn("[bold]step[/] {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("{task.fields[info]}"))
        try:
            with Progress(*columns, console=err, transient=False) as bar:
                task = bar.add_task("train", total=None, info="loading data and model")

                def on_event(e: dict[str, Any]) -> None:
                    if e["type"] == "step":
                        extra = (f" margin {e['reward_margin']:.3f}" if "reward_margin" in e
                                 else "")
                        bar.update(task, completed=e["step"], total=e["total_steps"],
                                   info=f"loss {e['loss']:.4f}{extra} · lr {e['lr']:.2e} · "
                                        f"{e['tokens_per_s']:,.0f} tok/s · ETA "
                                        f"{_duration(e['eta_s'])}")
                    elif e["type"] == "eval":
                        ppl = f" (perplexity {e['perplexity']:.2f})" if "perplexity" in e else ""
                        bar.console.print(f"step {e['step']}: eval loss "
                                          f"{e['eval_loss']:.4f}{ppl}")
                    elif e["type"] == "checkpoint":
                        bar.console.print(f"[dim]checkpoint {e['path']}[/]")
                    elif e["type"] == "resume":
                        bar.console.print(f"resumed from {e['path']}")

                result = run_training(cfg, resume=resume, on_event=on_event,
                                      should_stop=lambda: stop["asked"])
        finally:
            signal.signal(signal.SIGINT, previous)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
