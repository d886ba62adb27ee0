"""`souverain doctor`: prints `souverain.doctor.report()` (egress findings, data folders,
versions) as tables or JSON; exit code 1 when something could send data out. Never imports
torch."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from souverain.cli.common import err, human_bytes, out


def _print_report(r: dict[str, Any]) -> None:
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
    from souverain.doctor import report

    r = report(api_keys_file)
    if as_json:
        out.print_json(json.dumps(r))
    else:
        _print_report(r)
    raise typer.Exit(1 if r["egress"] else 0)
