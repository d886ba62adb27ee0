"""`souverain batch run`: a file of batch requests through a model in this process, offline.

The same lines as a batch job of `souverain serve` (`souverain.batch.lines`): the requests run
through the same route handlers (`souverain.server.batch.LineExecutor` over an app built in
this process, no HTTP), with ``--max-num-seqs`` lines in flight so that the engine decodes them
all together at full batch (as vLLM's ``run_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from souverain.cli.common import (
    DtypeOpt,
    KvOpt,
    QuantOpt,
    ThreadsOpt,
    err,
    user_errors,
)
from souverain.errors import SouverainError

batch_app = typer.Typer(
    help=("Batch requests offline: the JSONL a batch job of `souverain serve` takes "
          "(one {\"custom_id\", \"body\"} per line), run on a model in this process; the "
          "results file has the lines the job's output and error files have."),
    no_args_is_help=True, rich_markup_mode="rich")

RequestsArg = typer.Argument(..., help="JSONL file: one {\"custom_id\": \"...\", \"body\": "
                                       "{...}} per line (body: the endpoint's request).")
ModelOpt = typer.Option(..., "--model", "-m",
                        help="Alias, .gguf file or model folder (for --endpoint "
                             "/v1/embeddings: a sentence-transformers folder or "
                             "souverain-embed).")
OutputOpt = typer.Option(..., "--output", "-o", help="Where the results go (JSONL, one line "
                                                     "per request, in input order).")
EndpointOpt = typer.Option("/v1/chat/completions", "--endpoint", "-e",
                           help="/v1/chat/completions, /v1/fim/completions, /v1/completions "
                                "or /v1/embeddings.")
NameOpt = typer.Option(None, "--name", help="The model name the bodies may give in "
                                            "\"model\" (default: the alias or folder name).")
ErrorFileOpt = typer.Option(None, "--error-file",
                            help="Put the failed requests here instead of in --output.")
MaxNumSeqsOpt = typer.Option(64, "--max-num-seqs", min=1,
                             help="Requests in flight, decoded together in one batch.")
DefaultTemperatureOpt = typer.Option(0.7, "--default-temperature", min=0.0,
                                     help="Temperature when a request gives none (as serve).")


@batch_app.command("run")
def run(
    requests: Path = RequestsArg,
    model: str = ModelOpt,
    output: Path = OutputOpt,
    endpoint: str = EndpointOpt,
    name: str | None = NameOpt,
    error_file: Path | None = ErrorFileOpt,
    max_num_seqs: int = MaxNumSeqsOpt,
    default_temperature: float = DefaultTemperatureOpt,
    dtype: str = DtypeOpt,
    quantization: str = QuantOpt,
    kv_cache_gib: float | None = KvOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Run every request of REQUESTS (JSONL) on MODEL and write one result line each.

    A line that cannot run (not JSON, no custom_id, a duplicate one) or that the endpoint
    refuses gets an error line ({"error": {"code", "message"}}) and the others run.

    Examples:
      souverain batch run requests.jsonl --model smollm2-135m-instruct -o results.jsonl
      souverain batch run fim.jsonl -m /models/codestral.gguf -e /v1/fim/completions \\
          -o out.jsonl --error-file errors.jsonl
    """
    with user_errors():
        from souverain.batch.lines import ENDPOINTS, read_lines

        if endpoint not in ENDPOINTS:
            raise SouverainError(f"--endpoint {endpoint!r} is not supported; use one of "
                                 f"{', '.join(ENDPOINTS)}.")
        data = requests.read_bytes()
        lines = read_lines([(requests.name, data)])
        if not lines:
            raise SouverainError(f"{requests} holds no request (one JSON object per line: "
                                 "{\"custom_id\": \"...\", \"body\": {...}}).")
        for path in (output, error_file):
            if path is not None and path.parent and not path.parent.is_dir():
                raise SouverainError(f"Cannot write {path}: folder {path.parent} does not "
                                     "exist.")
        app, served = _app(model, name, endpoint, max_num_seqs, default_temperature, dtype,
                           quantization, kv_cache_gib, threads)
        try:
            ok, failed = asyncio.run(_run_all(app, endpoint, served, lines, output, error_file,
                                              max_num_seqs))
        finally:
            app.state.registry.shutdown()
        where = f"{output}" + (f" (errors: {error_file})" if error_file else "")
        err.print(f"{ok} succeeded, {failed} failed -> {where}")


def _app(model: str, name: str | None, endpoint: str, max_num_seqs: int,
         default_temperature: float, dtype: str, quantization: str,
         kv_cache_gib: float | None, threads: int | None) -> tuple[Any, str]:
    """An app (no HTTP) serving MODEL, its model loaded with a bar; and the served name."""
    from souverain.cli.serve import load_now, served_models
    from souverain.engine.config import EngineConfig
    from souverain.server.app import ServerConfig, create_app
    from souverain.server.registry import ModelRegistry

    embeddings = endpoint == "/v1/embeddings"
    config = ServerConfig(libraries=False, finetune=False, audit=None,
                          max_pending=max(256, 2 * max_num_seqs),
                          default_temperature=default_temperature,
                          embed_model=model if embeddings else None)
    if embeddings:
        registry = ModelRegistry([])
        app = create_app(registry, config)
        return app, app.state.embeddings.name

    def engine_config() -> EngineConfig:
        return EngineConfig(dtype=dtype, quantization=quantization, threads=threads,
                            kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs)

    served = served_models(model, name, [], engine_config)
    registry = ModelRegistry(served)
    load_now(registry, served[0])
    return create_app(registry, config), served[0].name


async def _run_all(app: Any, endpoint: str, model: str, lines: list[Any], output: Path,
                   error_file: Path | None, in_flight: int) -> tuple[int, int]:
    """Every line, ``in_flight`` at once; results written in input order as they come."""
    from souverain.batch.lines import dumps, result_line
    from souverain.server.batch import LineExecutor

    executor = LineExecutor(app)
    job_id = uuid.uuid4().hex
    slots = asyncio.Semaphore(in_flight)
    results: dict[int, tuple[bool, dict[str, Any]]] = {}
    counts = [0, 0]

    async def one(line: Any) -> None:
        try:
            if line.problem is not None:
                results[line.index] = result_line(job_id, line, None, None)
            else:
                status, body = await executor.execute(endpoint, model, None, line)
                results[line.index] = result_line(job_id, line, status, body)
        finally:
            slots.release()

    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(output, "wb"))
        errors = stack.enter_context(open(error_file, "wb")) if error_file else out
        bar = stack.enter_context(Progress(
            TextColumn("[bold]batch[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("requests"), TimeElapsedColumn(), console=err, transient=True))
        task = bar.add_task("", total=len(lines))
        written = 0

        def flush() -> None:  # the finished lines that come next in input order
            nonlocal written
            while written in results:
                ok, line_out = results.pop(written)
                (out if ok else errors).write(dumps(line_out))
                counts[0 if ok else 1] += 1
                written += 1
            bar.update(task, completed=written)

        tasks: set[asyncio.Task[None]] = set()
        for line in lines:
            await slots.acquire()  # at most `in_flight` requests at once
            t = asyncio.create_task(one(line))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            flush()
        while tasks:
            done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # (a bug: raise it)
            flush()
        flush()
    return counts[0], counts[1]

