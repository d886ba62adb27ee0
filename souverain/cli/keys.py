"""`souverain keys add|list|revoke`: the API keys file `souverain serve --api-keys-file` reads
(only SHA-256 hashes are stored; a key is printed once, when it is made). Imports only the
keys file's module of the server: no torch, no FastAPI app.
"""

from __future__ import annotations

import typer

from souverain.cli.common import err, out, user_errors

keys_app = typer.Typer(help="Manage the API keys file of `souverain serve` (only hashes are "
                            "stored; a key is shown once, when it is made).",
                       no_args_is_help=True)


@keys_app.command("add")
def keys_add(
    file: str = typer.Argument(..., help="Keys file (created with mode 0600 if missing)."),
    key_name: str = typer.Argument(..., help="Who or what the key is for, e.g. alice."),
    models: str | None = typer.Option(None, "--models",
                                      help="Comma-separated model ids it may use (all if unset)."),
    admin: bool = typer.Option(False, "--admin",
                               help="Let it administer the server: deprecate, withdraw, "
                                    "restore, delete models (scopes=admin)."),
) -> None:
    """Make a new API key: prints it once; the file keeps only its SHA-256 hash.

    Example: souverain keys add keys.txt alice --models mistral-small-latest
    """
    with user_errors():
        from souverain.server.auth import add_key

        key_id, key = add_key(file, key_name, models.split(",") if models else None,
                              admin=admin)
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

        for k in APIKeys.from_file(file).keys:
            models = ",".join(sorted(k.models)) if k.models else "all models"
            admin = "  admin" if "admin" in k.scopes else ""
            out.print(f"{k.key_id}  {k.name}  {models}{admin}")
