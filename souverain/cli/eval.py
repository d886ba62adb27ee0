"""`souverain eval ...`: `run` (the evaluation suites of souverain.eval.suites on a served or
local model, against a base, with a policy, reports, upload and `--every` scheduling) and
`moderation` (the moderation model's labelled set).

`souverain eval moderation` scores souverain's labelled moderation set through a server's
``POST /v1/moderations`` (souverain's or any La Plateforme-compatible one) and prints
per-category precision, recall, F1, AUROC, false positives on hard negatives and latency;
``-o`` writes the report with every text's scores as JSON. Cheap to import: the suites need no
torch (the model runs in the server).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from souverain.cli.common import err, out, user_errors
from souverain.eval import EvalError
from souverain.eval.http_scorer import HttpModerationScorer
from souverain.eval.moderation import (
    DEFAULT_SET,
    DEFAULT_THRESHOLD,
    evaluate,
    load_set,
    score_set,
    spread,
    tables,
)

eval_app = typer.Typer(
    help="Measure models on souverain's evaluation suites and print the figures "
         "(`souverain eval COMMAND --help` for each).\n\n"
         "  souverain eval run --model smollm2-135m-instruct --limit 20 -o eval-out\n\n"
         "  souverain eval moderation --url http://127.0.0.1:8000 "
         "--model mistral-moderation-latest -o results.json",
    no_args_is_help=True, rich_markup_mode="rich")


@eval_app.command("moderation")
def moderation(
    url: str = typer.Option("http://127.0.0.1:8000", "--url",
                            help="The server: `souverain serve` or any La Plateforme-compatible "
                                 "API (https://api.mistral.ai); with or without /v1."),
    model: str = typer.Option("mistral-moderation-latest", "--model", "-m",
                              help="The moderation model the server serves (GET /v1/models)."),
    api_key: str | None = typer.Option(None, "--api-key",
                                       help="Bearer key, if the server asks for one "
                                            "(default: $MISTRAL_API_KEY)."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", min=0.0, max=1.0,
                                    help="A text is flagged for a category when its score is "
                                         ">= this."),
    limit: int | None = typer.Option(None, "--limit", min=1,
                                     help="Score only N texts, taken evenly across the set "
                                          "(every category and language keeps its share)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1,
                                   help="Texts per request (latency is timed per request)."),
    data: Path = typer.Option(DEFAULT_SET, "--data",
                              help="An evaluation set in the same JSONL format (default: the "
                                   "bundled one; see souverain/eval/data/README.md).",
                              show_default=False),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="Write the report and every text's scores here "
                                            "(JSON)."),
    timeout: float = typer.Option(120.0, "--timeout", min=1.0,
                                  help="Seconds to wait for one request."),
) -> None:
    """Score the moderation set through POST /v1/moderations and print per-category
    precision, recall, F1, AUROC, false positives on hard negatives and latency.

    The bundled set: at least 40 messages per La Plateforme v2 category (sexual,
    hate_and_discrimination, violence_and_threats, dangerous, criminal, selfharm, health,
    financial, law, pii, jailbreaking) in English, French, German, Spanish and Italian, plus
    hard negatives (fine texts that look risky) and benign texts. A v1 model's
    dangerous_and_criminal_content is scored against dangerous OR criminal.

    Examples:
      souverain serve --moderation-model smollm2-135m-instruct   (in another terminal)
      souverain eval moderation -o moderation-smollm2.json
      souverain eval moderation --url https://api.mistral.ai --model mistral-moderation-2603 \\
          --api-key $MISTRAL_API_KEY --limit 100
    """
    with user_errors():
        examples = spread(load_set(data), limit)
        if output is not None and output.is_dir():
            raise EvalError(f"-o {output} is a folder; give a file name such as "
                            f"{output / 'moderation.json'}")
        scorer = HttpModerationScorer(url, model, api_key or os.environ.get("MISTRAL_API_KEY"),
                                      timeout_s=timeout)
        with Progress(TextColumn("[bold]scoring[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("texts · {task.description}"), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task(model, total=len(examples))
            run = score_set(examples, scorer, batch_size,
                            on_batch=lambda n: bar.advance(task, n))
        report = evaluate(run, threshold)
        for table in tables(report, title=f"{model} at {scorer.endpoint}"):
            out.print(table)
        if output is not None:
            doc = report.to_json(model=model, url=scorer.endpoint, data=str(data),
                                 limit=limit, batch_size=batch_size)
            output.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
                              encoding="utf-8")
            err.print(f"report written to {output}")


# -- souverain eval run ----------------------------------------------------------------------
RUN_HELP = """Run evaluation suites on a model (and a base to compare with) and write a JSON
and a self-contained HTML report.

The model is a client of the API like any other: a model id served at --url, or a local
model (path or alias) that this command serves itself on 127.0.0.1 for the run. Suites:
quality, safety, bias, multilingual, structured, grounding (default: all; --suite picks).

Examples:

  # the bundled model, two suites, 20 items each, reports in ./eval-out
  souverain eval run --model smollm2-135m-instruct --suite safety --suite bias \\
      --limit 20 -o eval-out

  # a fine-tuned adapter against its base model, gated by a policy (exit 1 if it fails)
  souverain eval run --model /models/Mistral-7B-Instruct-v0.3 --adapter runs/support/final \\
      --policy release-policy.json -o eval-support

  # a served model against another, then recorded on the server (GET /v1/models/ID links it)
  souverain eval run --url http://127.0.0.1:8000 --model ft:mistral-7b:support:1a2b \\
      --base mistral-7b --suite safety --upload

  # your own data: perplexity on your texts, your multiple-choice task
  souverain eval run --model my-model --url http://gpu-box:8000 --suite quality \\
      --file quality=docs/handbook.txt --file quality=tasks/support_mc.yaml

  # monitoring after release: every 6 hours against the live server, one folder per run
  souverain eval run --url http://127.0.0.1:8000 --model mistral-small-latest \\
      --suite safety --limit 40 --every 6h -o /var/lib/souverain/eval

--every keeps the process running; cron or a systemd timer is the alternative (one run per
start: `0 */6 * * * souverain eval run --url ... -o /var/lib/souverain/eval/$(date +%F-%H)`).

A policy file is JSON: {"suites": ["safety", "bias"], "limit": 40, "thresholds": [{"suite":
"safety", "metric": "over_refusal_rate", "max": 0.2}, {"suite": "safety", "metric":
"harmful_refusal_rate", "min": 0.5}, {"suite": "safety", "metric": "over_refusal_rate",
"max_regression": 0.02}]}: min/max bound the candidate; max_regression bounds how much worse
than --base it may be. Its suites and limit apply unless --suite / --limit say otherwise.

Exit codes: 0 done (policy passed), 1 the policy failed (reasons printed), 2 bad input.
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``1d``, ``1h30m`` -> seconds; EvalError otherwise."""
    spec = text.strip().lower()
    parts = _DURATION.findall(spec)
    if not parts or _DURATION.sub("", spec).strip():
        raise EvalError(f"--every {text!r} is not a duration; write e.g. 30m, 6h, 1d or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds < 1:
        raise EvalError(f"--every {text!r} is under a second; give at least 1s")
    return seconds


def _suite_files(specs: list[str]) -> dict[str, list[Path]]:
    from souverain.eval.suites import SUITES

    files: dict[str, list[Path]] = {}
    for spec in specs:
        suite, sep, path = spec.partition("=")
        if not sep or not suite or not path:
            raise EvalError(f"--file {spec!r} must be SUITE=PATH, e.g. quality=notes.txt")
        if suite not in SUITES:
            raise EvalError(f"--file {spec!r} names suite {suite!r}; choose among "
                            f"{', '.join(SUITES)}")
        if not Path(path).exists():
            raise EvalError(f"--file {spec!r}: {path} does not exist; give an existing file")
        files.setdefault(suite, []).append(Path(path))
    return files


def _load_policy(path: Path) -> Any:
    from souverain.eval.policy import Policy

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EvalError(f"--policy {path} is not UTF-8 text; give a JSON file") from None
    except ValueError as exc:
        raise EvalError(f"--policy {path} is not valid JSON ({exc}); fix the file") from None
    return Policy.parse(doc, where=f"--policy {path}")


def _served_name(model: str) -> str:
    """The id a local model is served under: the alias, or the file stem / folder name."""
    path = Path(model)
    name = path.stem if path.suffix in (".gguf", ".safetensors", ".pth") else path.name
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-") or "model"


class _Bars:
    """One rich bar per suite and role (the suite's `size` is its total)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, key: str, done: int, total: int) -> None:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(key, total=total or None)
        self.progress.update(self.tasks[key], completed=done, total=total or None)


def _print_run(run: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{run.candidate['model']}"
                               + (f" vs {run.base['model']}" if run.base else "")
                               + f" · {run.id}"))
    for col in ("suite", "metric", "candidate [95% CI]", "n"):
        table.add_column(col, justify="right" if col == "n" else "left")
    if run.base:
        table.add_column("base")
        table.add_column("Δ [95% CI]")
    for suite, entry in run.suites.items():
        base = entry.get("base")
        for name, m in entry["candidate"].metrics.items():
            ci = f" [{m.low:.3f}, {m.high:.3f}]" if m.low is not None and m.high is not None \
                else ""
            row = [suite, escape(name) + (" ↑" if m.higher_is_better else " ↓"),
                   ("no data" if m.value != m.value else f"{m.value:.3f}") + ci, str(m.n)]
            if run.base:
                bm = base.metrics.get(name) if base else None
                d = entry["deltas"].get(name)
                row.append(f"{bm.value:.3f}" if bm is not None and bm.value == bm.value else "—")
                row.append(f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "—")
            table.add_row(*row)
    out.print(table)


def _one_run(model: str, url: str, api_key: str | None, base_model: str | None,
             suites: list[str], options: Any, files: dict[str, list[Path]], policy: Any,
             output: Path | None, upload: bool, timeout: float, command: str) -> bool:
    """One evaluation, its reports and upload; True when the policy passed (or there is none)."""
    from souverain.eval.report import render_html, write_report
    from souverain.eval.runner import run_eval
    from souverain.eval.target import ApiTarget

    candidate = ApiTarget(url, model, api_key, timeout, concurrency=options.concurrency)
    base = (ApiTarget(url, base_model, api_key, timeout, concurrency=options.concurrency)
            if base_model else None)
    with Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("items"), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        run = run_eval(candidate, base, suites, options, on_progress=_Bars(progress),
                       policy=policy, files=files)
    run.meta["command"] = command
    _print_run(run)
    if output is not None:
        json_path, html_path = write_report(run, output)
        err.print(f"report written to {json_path} and {html_path}")
    passed = run.verdict is None or bool(run.verdict["passed"])
    if run.verdict is not None and passed:
        out.print("[bold green]policy passed[/]")
    elif run.verdict is not None:
        out.print("[bold red]policy failed:[/]")
        for reason in run.verdict["reasons"]:
            out.print(f"  - {reason}", markup=False, highlight=False)
    if upload:  # a failed run is recorded too: it is the evidence of a refused release
        try:
            candidate.post("/observability/evaluation-runs_v2",
                           {"run": run.to_json(), "html": render_html(run)})
        except EvalError as exc:
            kept = f"; the report is in {output}" if output is not None else ""
            raise EvalError(f"run {run.id} was not recorded on the server: {exc}{kept}") \
                from None
        err.print(f"run {run.id} recorded at {candidate.url}/observability/evaluation-runs_v2")
    return passed


@eval_app.command("run", help=RUN_HELP)
def run_command(
    model: str = typer.Option(..., "--model", "-m",
                              help="The model: an id the server at --url serves, or without "
                                   "--url a local model (path or alias) served for the run."),
    url: str | None = typer.Option(None, "--url",
                                   help="A running server (`souverain serve` or any La "
                                        "Plateforme-compatible API), with or without /v1."),
    api_key: str | None = typer.Option(None, "--api-key",
                                       help="Bearer key (default: $MISTRAL_API_KEY)."),
    base: str | None = typer.Option(None, "--base",
                                    help="Compare with this model: an id at --url, or a local "
                                         "model served beside --model."),
    adapter: Path | None = typer.Option(None, "--adapter",
                                        help="A LoRA adapter folder: the candidate is "
                                             "--model + this adapter, the base is --model "
                                             "(local models only)."),
    suite: list[str] = typer.Option([], "--suite", "-s",
                                    help="A suite to run (repeatable; default: the policy's, "
                                         "else all)."),
    limit: int | None = typer.Option(None, "--limit", min=1,
                                     help="At most N items per suite, taken evenly across its "
                                          "groups (languages, categories)."),
    file: list[str] = typer.Option([], "--file",
                                   help="SUITE=PATH: your own data for a suite (repeatable)."),
    library_id: str | None = typer.Option(None, "--library-id",
                                          help="grounding: an existing library on the server."),
    policy_file: Path | None = typer.Option(None, "--policy",
                                            help="A policy JSON: thresholds the candidate must "
                                                 "meet (exit 1 when it fails)."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="A folder for report.json and report.html (with "
                                            "--every: one timestamped folder per run in it)."),
    upload: bool = typer.Option(False, "--upload",
                                help="Record the run (and its HTML) on the server at --url."),
    every: str | None = typer.Option(None, "--every",
                                     help="Run again on this period (30m, 6h, 1d) until "
                                          "interrupted; needs --url."),
    count: int | None = typer.Option(None, "--count", min=1,
                                     help="With --every: stop after N runs."),
    concurrency: int = typer.Option(4, "--concurrency", min=1,
                                    help="Requests in flight (the server batches them)."),
    seed: int = typer.Option(0, "--seed", help="Seed of any sampling of items."),
    timeout: float = typer.Option(300.0, "--timeout", min=1.0,
                                  help="Seconds to wait for one request."),
) -> None:
    import shlex
    import sys
    import time
    from contextlib import nullcontext
    from datetime import datetime, timezone

    from rich.markup import escape

    from souverain.eval.suite import SuiteOptions
    from souverain.eval.suites import SUITES

    with user_errors():
        files = _suite_files(file)
        policy = _load_policy(policy_file) if policy_file is not None else None
        suites = list(suite) or (list(policy.suites) if policy is not None else list(SUITES))
        for name in suites:
            if name not in SUITES:
                raise EvalError(f"--suite {name!r} is not a suite; choose among "
                                f"{', '.join(SUITES)}")
        if len(set(suites)) != len(suites):
            raise EvalError("a --suite is given twice; name each suite once")
        if limit is None and policy is not None:
            limit = policy.limit
        period = parse_duration(every) if every is not None else None
        if count is not None and period is None:
            raise EvalError("--count only applies with --every; drop it or add --every 6h")
        if period is not None and url is None:
            raise EvalError("--every runs against a live server; give its --url")
        if period is not None and output is None and not upload:
            raise EvalError("--every keeps each run's report; give -o DIR or --upload")
        if upload and url is None:
            raise EvalError("--upload records the run on a running server; give its --url")
        if adapter is not None:
            if url is not None:
                raise EvalError("--adapter serves a local model with the adapter; drop --url, "
                                "or evaluate the adapter's served id (ft:...) with --model")
            if base is not None:
                raise EvalError("--adapter compares the adapter with --model itself; drop "
                                "--base")
            if not adapter.is_dir():
                raise EvalError(f"--adapter {adapter} is not a folder; give the adapter's "
                                f"folder (lora.safetensors + lora_config.json, or PEFT's files)")
        if output is not None and output.exists() and not output.is_dir():
            raise EvalError(f"-o {output} is a file; give a folder for report.json and "
                            f"report.html")
        if policy is not None:
            policy.check_plan(suites, has_base=base is not None or adapter is not None)
        options = SuiteOptions(limit=limit, seed=seed, concurrency=concurrency,
                               library_id=library_id)
        key = api_key or os.environ.get("MISTRAL_API_KEY")
        command = shlex.join(["souverain", "eval", "run", *sys.argv[3:]]) \
            if sys.argv[1:3] == ["eval", "run"] else "souverain eval run"

        candidate_id, base_id = model, base
        server: Any = nullcontext(url)
        if url is None:
            from souverain.eval.target import local_server

            candidate_id = _served_name(model)
            extra = ["--name", candidate_id]
            if adapter is not None:
                base_id = candidate_id
                candidate_id = f"{candidate_id}-{_served_name(str(adapter))}"
                extra += ["--lora-modules", f"{candidate_id}={adapter}"]
            elif base is not None:
                base_id = _served_name(base)
                if base_id == candidate_id:
                    base_id += "-base"
                extra += ["--model", f"{base_id}={base}"]
            err.print(f"starting a local server for {model} …")
            server = local_server(model, extra_args=extra)

        passed = True
        with server as server_url:
            runs = 0
            while True:
                started = time.monotonic()
                folder = output
                if period is not None and output is not None:
                    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                    folder = output / stamp
                failure: EvalError | None = None
                try:
                    passed = _one_run(candidate_id, server_url, key, base_id, suites, options,
                                      files, policy, folder, upload, timeout, command)
                except EvalError as exc:
                    if period is None:
                        raise
                    failure = exc  # monitoring goes on; the next run may succeed
                    err.print(f"[bold red]run failed:[/] {escape(str(exc))}", highlight=False)
                runs += 1
                if period is None or (count is not None and runs >= count):
                    if failure is not None:
                        raise failure  # the last run's error is the exit status
                    break
                wait = max(0.0, period - (time.monotonic() - started))
                err.print(f"next run in {wait:.0f} s (Ctrl-C stops)")
                time.sleep(wait)
    if not passed:
        raise typer.Exit(1)
