"""The bench's command line: `bench_app`, a typer app with one callback and no subcommands.
`souverain bench ...` (the CLI registers it) and ``python -m souverain.bench ...`` are this
same app; `main` runs it on an argument list and returns the exit code.

Importing this module does not import torch: the engines load in their own subprocesses.
"""

from __future__ import annotations

import typer

from souverain.bench.plan import ENGINES, BenchOptions, LlamaConcurrency
from souverain.bench.session import run_bench

PROG = "souverain bench"

HELP = """The same workload on souverain, llama.cpp and transformers, one table.

python -m souverain.bench --model smollm2 --threads 2
python -m souverain.bench --model mistral-1b --threads 2 --formats q4_0
python -m souverain.bench --model ./any.gguf --engines souverain --quick

Workloads (``--model``):

* ``smollm2``: the bundled SmolLM2-135M-Instruct Q4_1 GGUF (all three engines read that file;
  transformers dequantizes it to float32).
* ``mistral-1b``: a random Mistral-shaped checkpoint (dim 2048, 16 layers, 32/8 heads, head_dim
  64, hidden 5632, vocab 32768, sliding window 4096, rope_theta 1e6; 0.86B parameters) written
  once into ``--cache-dir``: a Hugging Face folder (bf16 safetensors; transformers runs it) and
  F16 / Q8_0 / Q4_0 GGUF files of the same weights (souverain and llama.cpp run those).
* ``mistral-7b``: the same, in Mistral 7B v0.3's shape (dim 4096, 32 layers, 32/8 heads,
  head_dim 128, hidden 14336, no window; 7.25B parameters; 14.5 GB of safetensors in shards):
  ``--model mistral-7b --formats q4_0,q8_0 --quantization int4,int8 --safetensors``.
* any path or alias souverain can load (llama.cpp only runs ``.gguf`` files).

Rows measured per engine (prompts are seeded random token ids, identical for every engine;
greedy decoding; EOS never stops a sequence):

* prefill: tok/s of one 512-token prompt (time to its first token's logits);
* decode at batch 1: 128 new tokens after a 32-token prompt, ``(128 - 1) / (t_last - t_first)``;
* concurrency N (8, 16, 32 by default): N requests submitted at once, prompts of 16..256 tokens,
  128 new tokens each; aggregate = N * 128 / wall time (prefills included); time to first token
  p50/p95 measured from submission;
* RSS: each engine runs in its own subprocess, one after the other: RSS after loading and
  peak RSS (VmHWM) over the whole run;
* GB/s = bytes of weights read per token at batch 1 (every weight once, one row of the token
  embedding; KV cache reads not counted) x decode tok/s, against a measured read bandwidth.

How concurrency runs on each engine:

* souverain: ``LLMEngine`` (continuous batching), all requests added before the first ``step``.
* llama.cpp: llama-cpp-python's ``Llama`` object runs one sequence at a time, so the batched
  rows drive llama.cpp's own C batch API (``llama_batch`` + ``llama_decode`` on a context with
  ``n_seq_max = N``, one KV stream per sequence), scheduled like llama-server: every step
  carries one token per decoding sequence plus prompt chunks up to ``n_batch = 512`` tokens.
  ``--llama-concurrency sequential`` (or ``both``) also measures plain ``Llama.generate`` one
  request after another (what llama-cpp-python's own server does).
* transformers: one padded (left-padded) batch through ``model.generate``; every request gets
  its first token at the same moment.
"""

bench_app = typer.Typer(help=HELP, add_completion=False, subcommand_metavar="",
                        rich_markup_mode="rich")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: str = typer.Option("smollm2", "--model",
                              help="smollm2 | mistral-1b | mistral-7b (random, Mistral 7B's "
                                   "shape) | a path or alias souverain loads"),
    threads: int | None = typer.Option(None, "--threads", help="threads for every engine "
                                       "(default: physical cores)"),
    engines: str = typer.Option(",".join(ENGINES), "--engines"),
    quantization: str = typer.Option("none", "--quantization",
                                     help="souverain: none,int8,int4 (comma list)"),
    dtype: str = typer.Option("auto", "--dtype", help="souverain dtype (default auto)"),
    hf_dtype: str = typer.Option("float32", "--hf-dtype",
                                 help="transformers dtype (default float32)"),
    formats: str = typer.Option("f16,q8_0,q4_0", "--formats",
                                help="GGUF formats of mistral-1b / mistral-7b"),
    safetensors: bool = typer.Option(
        False, "--safetensors",
        help="mistral-1b / mistral-7b: also run souverain on the bf16 safetensors folder "
             "(quantized at load as --quantization says)"),
    concurrency: str = typer.Option("8,16,32", "--concurrency",
                                    help="concurrent request counts"),
    llama_concurrency: LlamaConcurrency = typer.Option("batched", "--llama-concurrency"),
    llama_flash_attn: bool = typer.Option(
        False, "--llama-flash-attn",
        help="llama.cpp flash attention (llama-cpp-python's default is off)"),
    repeats: int = typer.Option(1, "--repeats", help="prefill runs (best is kept)"),
    cache_dir: str = typer.Option("~/.cache/souverain/bench", "--cache-dir"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes: a smoke test"),
    prepare_only: bool = typer.Option(
        False, "--prepare-only",
        help="only write the mistral-1b checkpoint files (once) and exit"),
    no_bandwidth: bool = typer.Option(False, "--no-bandwidth",
                                      help="skip the bandwidth reference"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds per engine subprocess"),
    wait_quiet: float = typer.Option(
        0, "--wait-quiet", metavar="SECONDS",
        help="before each engine, wait up to this long for other processes to use "
        "under 15% of the CPUs (they are measured either way and reported)"),
    json_path: str | None = typer.Option(None, "--json", help="also write the results here"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table"),
    speculative: str = typer.Option(
        "none", "--speculative",
        help="souverain runs without (none) and with prompt-lookup speculative decoding "
             "(ngram), e.g. none,ngram; the extraction row (copy b=1) shows what it buys"),
    render: str | None = typer.Option(
        None, "--render", metavar="JSON",
        help="print the table of a saved --json report (with --markdown for BENCHMARKS.md) "
        "and exit"),
) -> None:
    options = BenchOptions(
        model=model, threads=threads, engines=engines, quantization=quantization, dtype=dtype,
        hf_dtype=hf_dtype, formats=formats, concurrency=concurrency,
        llama_concurrency=llama_concurrency, llama_flash_attn=llama_flash_attn,
        repeats=repeats, cache_dir=cache_dir, quick=quick, prepare_only=prepare_only,
        no_bandwidth=no_bandwidth, timeout=timeout, wait_quiet=wait_quiet,
        json_path=json_path, markdown=markdown, render=render, speculative=speculative,
        safetensors=safetensors)
    raise typer.Exit(run_bench(options, "python -m souverain.bench " + _given_flags(ctx)))


def _given_flags(ctx: typer.Context) -> str:
    """The flags given on the command line (not those left at their default), in the order
    of ``--help``: how the report says the run can be repeated."""
    words: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name != "COMMANDLINE":
            continue
        if getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            words += [param.opts[0], str(ctx.params[param.name])]
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    """Run the command on ``argv`` (default: this process's arguments) and return its exit
    code instead of exiting; usage errors are printed as the command line prints them."""
    try:
        bench_app(args=argv, prog_name=PROG)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        raise  # a message for the user: it exits with code 1
    return 0
