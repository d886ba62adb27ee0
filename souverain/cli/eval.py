"""`souverain eval ...`: evaluation suites, one subcommand each (`moderation` today).

`souverain eval moderation` scores souverain's labelled moderation set through a server's
``POST /v1/moderations`` (souverain's or any La Plateforme-compatible one) and prints
per-category precision, recall, F1, AUROC, false positives on hard negatives and latency;
``-o`` writes the report with every text's scores as JSON. Cheap to import: the suites need no
torch (the model runs in the server).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
         "(`souverain eval SUITE --help` for each).\n\n"
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
