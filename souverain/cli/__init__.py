"""The `souverain` command line: the typer `app` and `main()`, one module per command family.

  run.py       chat, generate, inspect, ask (a model loaded in this process)
  serve.py     serve (La Plateforme's HTTP API)
  keys.py      keys add|list|revoke (the API keys file)
  audit.py     audit erase|prune (the audit log: a subject's content, retention)
  models.py    models deprecate|withdraw|restore|show (a model's lifecycle)
  library.py   library create|list|add|search|docs|remove|delete
  finetune.py  finetune validate|run|merge
  batch.py     batch run (a file of batch requests, offline, at full batch)
  eval.py      eval moderation (evaluation suites over a server's API)
  doctor.py    doctor (egress, data folders, versions)
  plan.py      plan measure|predict (capacity planning: a replica's curve -> a deployment)
  bench        `souverain.bench.command.bench_app`, registered here
  common.py    consoles, shared options, `user_errors` (user error -> one sentence, exit 2)

Every user-fixable problem (a bad path, a corrupt file, a bad flag value) ends the command with
one sentence on stderr and exit code 2, never a traceback. Importing this package, `--help`,
`keys` and `doctor` never import torch: heavy imports happen inside the commands that need them.
"""

from __future__ import annotations

import typer

from souverain.bench.command import bench_app
from souverain.cli.audit import audit_app
from souverain.cli.batch import batch_app
from souverain.cli.doctor import doctor
from souverain.cli.eval import eval_app
from souverain.cli.finetune import finetune_app
from souverain.cli.keys import keys_app
from souverain.cli.library import library_app
from souverain.cli.models import models_app
from souverain.cli.plan import plan_app
from souverain.cli.run import ask, chat, generate, inspect
from souverain.cli.serve import serve

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


# registered in the order `souverain --help` lists them
for command in (chat, generate, inspect, serve, ask):
    app.command()(command)
app.command()(doctor)
app.add_typer(bench_app, name="bench", short_help=(
    "Benchmark souverain against llama.cpp and transformers on the same workload, in one run "
    "(`souverain bench --help` lists the options; llama.cpp needs `pip install "
    "llama-cpp-python`)."))
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(library_app, name="library")
app.add_typer(finetune_app, name="finetune")
app.add_typer(batch_app, name="batch")
app.add_typer(eval_app, name="eval")
app.add_typer(plan_app, name="plan")


def main() -> None:
    app()
