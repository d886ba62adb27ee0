"""`souverain audit erase|prune`: the audit log's erasure of a subject's content (GDPR art. 17)
and its retention by hand (`souverain serve --audit-retention-days` applies it daily).

Both rewrite files atomically under the lock the server's writer honours, so they are safe
while `souverain serve` runs (`souverain.audit`'s docstring). Imports only `souverain.audit`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from souverain.cli.common import err, out, user_errors
from souverain.errors import SouverainError

audit_app = typer.Typer(help="Erase a subject's content from the audit log, or delete its "
                             "old days (safe while `souverain serve` runs).",
                        no_args_is_help=True)

DataDirOpt = typer.Option(
    None, "--data-dir", help="The --data-dir the server was started with: its audit/ folder "
                             "(default: $SOUVERAIN_HOME or ~/.local/share/souverain).")
AuditLogOpt = typer.Option(None, "--audit-log",
                           help="The server's --audit-log FILE, instead of the data folder.")
DryRunOpt = typer.Option(False, "--dry-run", help="Only count what would change.")


def _target(data_dir: str | None, audit_log: str | None) -> Path:
    from souverain.paths import audit_dir

    if audit_log:
        target = Path(audit_log).expanduser()
        if not target.is_file():
            raise SouverainError(f"No audit log file {target}; give the --audit-log the server "
                                 "writes, or --data-dir.")
        return target
    target = audit_dir(Path(data_dir).expanduser() if data_dir else None)
    if not target.is_dir():
        raise SouverainError(f"No audit log folder {target}; give the server's --data-dir "
                             "(or --audit-log FILE).")
    return target


@audit_app.command("erase")
def audit_erase(
    match: str | None = typer.Option(
        None, "--match", help="Text that identifies the subject (a name, a customer number); "
                              "matched case-insensitively in the logged request and response."),
    key_id: str | None = typer.Option(
        None, "--key-id", help="Only the records of this API key id (alone: all of its "
                               "content)."),
    data_dir: str | None = DataDirOpt,
    audit_log: str | None = AuditLogOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Replace the logged request and response of matching records by "[ERASED <date>]".

    Who called what, and when, stays: the log remains an audit log.

    Example: souverain audit erase --data-dir /srv/souverain --match "Marie Curie" --dry-run
    """
    with user_errors():
        from souverain.audit import erase

        if not (match and match.strip()) and not key_id:
            raise SouverainError("Say whose content to erase: --match TEXT, --key-id ID, or "
                                 "both.")
        result = erase(_target(data_dir, audit_log), match=match or None, key_id=key_id,
                       dry_run=dry_run)
        out.print(result.describe(dry_run=dry_run))


@audit_app.command("prune")
def audit_prune(
    older_than_days: int = typer.Option(..., "--older-than-days", min=0,
                                        help="Delete the records of days older than this."),
    content_only: bool = typer.Option(
        False, "--content-only", help="Keep the records; replace only their logged request "
                                      "and response texts by \"[EXPIRED <date>]\"."),
    data_dir: str | None = DataDirOpt,
    audit_log: str | None = AuditLogOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Delete the audit records older than N days (whole days, UTC), or only their texts.

    Examples:
      souverain audit prune --data-dir /srv/souverain --older-than-days 365
      souverain audit prune --data-dir /srv/souverain --older-than-days 30 --content-only
    """
    with user_errors():
        from souverain.audit import expire_content, prune

        action = expire_content if content_only else prune
        result = action(_target(data_dir, audit_log), older_than_days=older_than_days,
                        dry_run=dry_run)
        out.print(result.describe(dry_run=dry_run))
        if not result.searched:
            err.print("[dim]no audit file found[/]")
