"""`souverain plan measure|predict`: capacity planning. `measure` records one replica's
throughput / latency curve and memory figures on this machine (a JSON profile); `predict`
turns a profile and a target load into replicas, tensor-parallel ranks and machines, with the
figures to expect and the model's assumptions (`souverain.bench.capacity`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from souverain.cli.common import ModelArg, QuantOpt, ThreadsOpt, err, out, user_errors

plan_app = typer.Typer(help=(
    "Capacity planning: measure one replica's curve here, predict replicas / ranks / machines "
    "for a target load.\n\n"
    "souverain plan measure smollm2 --threads 2 -o profile.json\n\n"
    "souverain plan predict --profile profile.json --users 50 --prompt-tokens 64 "
    "--answer-tokens 16 --think-seconds 10 --ttft-slo 2 --tpot-slo 0.2"),
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich")


def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma list of integers") from None
    if not levels or levels[0] < 1:
        raise typer.BadParameter("concurrency levels must be integers >= 1")
    return levels


@plan_app.command()
def measure(
    model: str = ModelArg,
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the profile."),
    quantization: str = QuantOpt,
    dtype: str = typer.Option("auto", "--dtype"),
    threads: int | None = ThreadsOpt,
    concurrency: str = typer.Option("1,2,4,8", "--concurrency",
                                    help="Concurrency levels (comma list)."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    answer_tokens: int = typer.Option(16, "--answer-tokens", min=2),
    rounds: int = typer.Option(2, "--rounds", min=1,
                               help="Measured requests per level = rounds x concurrency."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", min=1, metavar="K"),
) -> None:
    """Measure one replica here (in this process, the real engine): at each concurrency,
    decode tok/s, TTFT and time per output token p50/p95; prefill tok/s; weights, KV bytes per
    token, RSS, the machine. Short by default (16-token answers)."""
    levels = _levels(concurrency)
    with user_errors():
        from souverain.bench.capacity_measure import measure_profile

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                       MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
        with bar:
            task = bar.add_task("starting", total=len(levels))

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            prof = measure_profile(model, quantization=quantization, dtype=dtype,
                                   threads=threads, concurrency=levels,
                                   prompt_tokens=prompt_tokens, answer_tokens=answer_tokens,
                                   rounds=rounds, tensor_parallel=tensor_parallel,
                                   progress=progress)
        output.write_text(json.dumps(prof, indent=2))
    table = Table(title=f"{model} · {prof['threads']} threads · TP {tensor_parallel} · "
                        f"prefill {prof['prefill_tok_s']:.0f} tok/s")
    for col in ("concurrency", "decode tok/s", "TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95"):
        table.add_column(col, justify="right")
    for p in prof["curve"]:
        table.add_row(str(p["concurrency"]), f"{p['decode_tok_s']:.1f}",
                      f"{p['ttft_p50_s'] * 1e3:.0f} ms", f"{p['ttft_p95_s'] * 1e3:.0f} ms",
                      f"{p['tpot_p50_s'] * 1e3:.0f} ms", f"{p['tpot_p95_s'] * 1e3:.0f} ms")
    out.print(table)
    m = prof["memory"]
    out.print(f"weights {m['weight_bytes'] / 2**20:.1f} MiB · KV {m['kv_bytes_per_token']} "
              f"bytes/token · RSS after load {m['rss_after_load_bytes'] / 2**20:.0f} MiB · "
              f"read {prof['machine']['read_gbs']:.1f} GB/s · profile: {output}")
    share = prof.get("others_cpu_share")
    if share is not None and share > 0.15:
        err.print(f"[yellow]warning:[/] other processes used {share:.0%} of the CPUs while "
                  "measuring: the curve is noisy; measure again on a quiet machine")


@plan_app.command()
def predict(
    profile: Path = typer.Option(..., "--profile", help="A profile from `plan measure`."),
    users: int = typer.Option(..., "--users", help="Concurrent users (closed loop)."),
    prompt_tokens: int = typer.Option(..., "--prompt-tokens"),
    answer_tokens: int = typer.Option(..., "--answer-tokens"),
    think_seconds: float = typer.Option(0.0, "--think-seconds",
                                        help="Each user's pause between answer and request."),
    prefix_share: float = typer.Option(0.0, "--prefix-share",
                                       help="Share of prompt tokens found in the prefix cache."),
    ttft_slo: float | None = typer.Option(None, "--ttft-slo", help="TTFT p95 target (s)."),
    tpot_slo: float | None = typer.Option(None, "--tpot-slo",
                                          help="Time per output token p95 target (s)."),
    machine_cores: int | None = typer.Option(None, "--machine-cores",
                                             help="Cores per machine (default: the profile's)."),
    machine_memory_gib: float | None = typer.Option(None, "--machine-memory-gib"),
    machine_bandwidth_gbs: float | None = typer.Option(
        None, "--machine-bandwidth-gbs",
        help="Read bandwidth per machine, GB/s (default: the profile's, scaled by threads "
             "up to its machine's cores)."),
    headroom: float = typer.Option(0.8, "--headroom",
                                   help="Plan this share of the SLO-bound concurrency."),
    replicas: int | None = typer.Option(None, "--replicas",
                                        help="Evaluate this many replicas instead of sizing."),
    replicas_per_machine: int | None = typer.Option(None, "--replicas-per-machine"),
    tensor_parallel: int | None = typer.Option(
        None, "--tensor-parallel", metavar="K",
        help="Evaluate K ranks per replica on one machine (default: sized for memory)."),
    allreduce_us: float = typer.Option(50.0, "--allreduce-us",
                                       help="Cost of one all-reduce (microseconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict replicas, ranks per replica and machines for a target load, with the TTFT,
    time per output token and throughput to expect; every assumption is printed."""
    from souverain.bench.capacity import Target, load_profile
    from souverain.bench.capacity import predict as run_predict

    with user_errors():
        prof = load_profile(profile)
        res = run_predict(prof, Target(
            users=users, prompt_tokens=prompt_tokens, answer_tokens=answer_tokens,
            think_seconds=think_seconds, prefix_share=prefix_share, ttft_slo=ttft_slo,
            tpot_slo=tpot_slo, machine_cores=machine_cores,
            machine_memory_gib=machine_memory_gib, machine_bandwidth_gbs=machine_bandwidth_gbs,
            headroom=headroom, replicas=replicas, replicas_per_machine=replicas_per_machine,
            tensor_parallel=tensor_parallel, allreduce_us=allreduce_us))
    if as_json:
        out.print_json(json.dumps(res))
        return
    p, r = res["predicted"], res["per_replica"]
    table = Table(title=f"{users} users · {prompt_tokens}+{answer_tokens} tokens · think "
                        f"{think_seconds:g} s · prefix share {prefix_share:.0%}")
    table.add_column("")
    table.add_column("")
    m = res["machine"]
    rows = [
        ("replicas", str(res["replicas"])),
        ("tensor-parallel ranks per replica", str(res["tensor_parallel"])),
        ("machines", f"{res['machines']} x ({m['cores']} cores, {m['memory_gib']} GiB"
                     + (f", {m['bandwidth_gbs']} GB/s" if m["bandwidth_gbs"] else "") + ")"),
        ("replicas per machine · threads each",
         f"{res['replicas_per_machine']} · {res['threads_per_replica']}"),
        ("in flight per replica (SLO capacity)",
         f"{r['concurrency']:.2f} ({r['capacity_concurrency']:.2f})"),
        ("memory per rank", f"{r['memory_gib']['total_per_rank']:.2f} GiB"),
        ("TTFT p50 / p95", f"{p['ttft_p50_s'] * 1e3:.0f} / {p['ttft_p95_s'] * 1e3:.0f} ms"),
        ("TPOT p50 / p95", f"{p['tpot_p50_s'] * 1e3:.1f} / {p['tpot_p95_s'] * 1e3:.1f} ms"),
        ("requests/s · decode tok/s · prefill tok/s",
         f"{p['requests_per_s']:.2f} · {p['decode_tok_s']:.1f} · {p['prefill_tok_s']:.1f}"),
        ("SLOs met", "yes" if res["slo_met"] else "[bold red]no[/]"),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for w in res["warnings"]:
        out.print(f"[yellow]warning:[/] {w}")
    out.print("assumptions:")
    for a in res["assumptions"]:
        out.print(f"  - {a}")
