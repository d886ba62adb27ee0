"""`souverain models deprecate|withdraw|restore|show|release`: a model's lifecycle (and
`release`: a fine-tuned model its release gate holds, served anyway), written straight
into the database the servers read (the jobs database, or DATA/lifecycle.db for a server run
with --no-finetune); running servers apply a change within a second. Each change is appended
to DATA/audit/ like the server's own records (``key_id`` null, ``source`` cli). Cheap to
import: SQLAlchemy is imported when a command runs.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import typer

from souverain.cli.common import out, user_errors
from souverain.errors import SouverainError

models_app = typer.Typer(
    help="Deprecate, withdraw or restore a served model (what GET /v1/models shows, and what "
         "requests to it get). Safe while `souverain serve` runs.",
    no_args_is_help=True)

DataDirOpt = typer.Option(
    None, "--data-dir", help="The server's --data-dir (default: $SOUVERAIN_HOME or "
                             "~/.local/share/souverain): its jobs database or lifecycle.db, "
                             "and its audit/ folder.")
JobsDbOpt = typer.Option(None, "--jobs-db", help="The server's --jobs-db URL, if it has one "
                                                 "(servers sharing it share the lifecycle).")
ReplacementOpt = typer.Option(None, "--replacement",
                              help="The model to use instead (the card's "
                                   "deprecation_replacement_model; named in the 410).")
DateOpt = typer.Option(None, "--date", help="YYYY-MM-DD: when the model is retired (the "
                                            "card's deprecation date; the Sunset header).")


def _store(data_dir: str | None, jobs_db: str | None):  # -> LifecycleStore
    from souverain.finetune.lifecycle import LifecycleStore, lifecycle_db_url
    from souverain.finetune.store import default_db_url

    root = Path(data_dir).expanduser() if data_dir else None
    if jobs_db:
        return LifecycleStore(jobs_db)
    jobs_url = default_db_url(root)
    if Path(jobs_url.removeprefix("sqlite:///")).is_file():
        return LifecycleStore(jobs_url)
    return LifecycleStore(lifecycle_db_url(root))


def _change(action: str, model_id: str, data_dir: str | None, jobs_db: str | None, *,
            replacement: str | None = None, date: str | None = None,
            fallback: bool | None = None) -> None:
    from souverain.audit import append_record
    from souverain.paths import audit_dir

    if not model_id.strip():
        raise SouverainError("Give the model id, as GET /v1/models lists it.")
    store = _store(data_dir, jobs_db)
    try:
        old, new = store.apply(action, model_id, f"cli:{getpass.getuser()}",
                               replacement=replacement, date=date, fallback=fallback)
    finally:
        store.close()
    append_record(audit_dir(Path(data_dir).expanduser() if data_dir else None), {
        "request_id": None, "key_id": None, "key_name": f"cli:{getpass.getuser()}",
        "method": "CLI", "route": f"souverain models {action}", "model": model_id,
        "status": 200, "source": "cli",
        "lifecycle": {"action": action, "model": model_id, "old": old.summary(),
                      "new": new.summary()}})
    out.print(f"{model_id}: {old.state} -> {new.state}"
              + (f" (replacement {new.replacement})" if new.replacement else "")
              + (f", retired on {new.deprecation}" if new.deprecation else ""))


@models_app.command("deprecate")
def deprecate(
    model_id: str = typer.Argument(..., help="The model id, as GET /v1/models lists it."),
    replacement: str | None = ReplacementOpt,
    date: str | None = DateOpt,
    data_dir: str | None = DataDirOpt,
    jobs_db: str | None = JobsDbOpt,
) -> None:
    """Mark a model deprecated: it keeps answering, its card shows the date and replacement,
    and its responses carry Deprecation and Sunset headers.

    Example: souverain models deprecate small-v1 --replacement small-v2 --date 2027-06-30
    """
    with user_errors():
        _change("deprecate", model_id, data_dir, jobs_db, replacement=replacement, date=date)


@models_app.command("withdraw")
def withdraw(
    model_id: str = typer.Argument(..., help="The model id, as GET /v1/models lists it."),
    replacement: str | None = ReplacementOpt,
    date: str | None = DateOpt,
    fallback: bool | None = typer.Option(
        None, "--fallback/--no-fallback",
        help="Serve its requests with the replacement (header x-souverain-model-replaced) "
             "instead of a 410; default: the server's --withdrawn-fallback."),
    data_dir: str | None = DataDirOpt,
    jobs_db: str | None = JobsDbOpt,
) -> None:
    """Withdraw a model: requests to it get 410 model_withdrawn naming the replacement
    (or are served by the replacement with --fallback).

    Example: souverain models withdraw small-v1 --replacement small-v2
    """
    with user_errors():
        if fallback and not replacement:
            raise SouverainError("--fallback needs --replacement ID: the model that serves "
                                 "the withdrawn model's requests.")
        _change("withdraw", model_id, data_dir, jobs_db, replacement=replacement, date=date,
                fallback=fallback)


@models_app.command("restore")
def restore(
    model_id: str = typer.Argument(..., help="The model id, as GET /v1/models lists it."),
    data_dir: str | None = DataDirOpt,
    jobs_db: str | None = JobsDbOpt,
) -> None:
    """Put a deprecated or withdrawn model back in service (date and replacement cleared).

    Example: souverain models restore small-v1
    """
    with user_errors():
        _change("restore", model_id, data_dir, jobs_db)


@models_app.command("show")
def show(
    data_dir: str | None = DataDirOpt,
    jobs_db: str | None = JobsDbOpt,
) -> None:
    """Print every model's lifecycle row as JSON lines (models without one are active)."""
    with user_errors():
        store = _store(data_dir, jobs_db)
        try:
            for row in store.all().values():
                typer.echo(json.dumps({"model": row.model_id, **row.summary()}))  # unwrapped
        finally:
            store.close()


@models_app.command("release")
def release(
    model_id: str = typer.Argument(..., help="The held ft: model (or its fine-tuning job id)."),
    reason: str = typer.Option(..., "--reason", help="Why it is served although its release "
                                                     "gate holds it (kept in the job's events "
                                                     "and the audit log)."),
    data_dir: str | None = DataDirOpt,
    jobs_db: str | None = JobsDbOpt,
) -> None:
    """Serve a fine-tuned model its release gate holds (an evaluation that failed, errored
    or has not finished): an override, recorded in the job's events and the audit log.

    Example: souverain models release ft:small:support:1a2b3c4d --reason "reviewed by legal"
    """
    with user_errors():
        from souverain.audit import append_record
        from souverain.finetune.release_gate import GateRows
        from souverain.finetune.store import JobsError, JobStore
        from souverain.paths import audit_dir

        if len(reason.strip()) < 3:
            raise SouverainError("--reason must say why the model is released (3 characters "
                                 "at least).")
        root = Path(data_dir).expanduser() if data_dir else None
        by = f"cli:{getpass.getuser()}"
        store = JobStore(jobs_db, root)
        try:
            gates = GateRows(store)
            job_id = gates.job_of(model_id)
            before, after = gates.release(job_id, reason.strip(), by)
        except JobsError as exc:
            raise SouverainError(str(exc)) from None
        finally:
            store.close()
        append_record(audit_dir(root), {
            "request_id": None, "key_id": None, "key_name": by, "method": "CLI",
            "route": "souverain models release", "model": after.fine_tuned_model,
            "status": 200, "source": "cli",
            "release": {"job_id": job_id, "model": after.fine_tuned_model,
                        "reason": reason.strip(), "by": by,
                        "previous_status": before.evaluation_status,
                        "previous_reasons": before.evaluation_reasons or []}})
        out.print(f"{after.fine_tuned_model or job_id}: released (evaluation "
                  f"{before.evaluation_status} -> {after.evaluation_status})")
