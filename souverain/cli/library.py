"""`souverain library ...`: document libraries on this machine (create, list, add, search,
docs, remove, delete, verify), all through one `LibraryStore` under the data folder (or the
folder and database that servers sharing libraries were given: --libraries-dir, --libraries-db). The store,
the parsers and the embedder are imported inside the commands. `remove` and `delete` append
what they erased to the audit log under the data folder (as the server's DELETE routes do).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from souverain.cli.common import DataDirOpt, LibraryArg, err, human_bytes, out, user_errors

if TYPE_CHECKING:
    from souverain.rag.store import Erasure, LibraryStore


LibrariesDirOpt = typer.Option(
    None, "--libraries-dir",
    help="The libraries folder a server was given with --libraries-dir (default: "
         "DATA_DIR/libraries).")
LibrariesDbOpt = typer.Option(
    None, "--libraries-db",
    help="The metadata database a server was given with --libraries-db, e.g. a shared "
         "postgresql+psycopg://USER:PASS@HOST/DB (default: meta.sqlite in the libraries "
         "folder).")


def library_store(data_dir: str | None, folder: str | None = None,
                  db: str | None = None) -> LibraryStore:
    """The libraries under ``data_dir`` (default: the data home's libraries/ folder), or in
    ``folder`` with their metadata in the database ``db`` (the servers' --libraries-dir and
    --libraries-db: the same libraries as theirs)."""
    from souverain.paths import libraries_dir
    from souverain.rag.store import LibraryStore

    root = Path(folder).expanduser() if folder else \
        libraries_dir(Path(data_dir).expanduser() if data_dir else None)
    return LibraryStore(root, db=db)


def audit_erasure(data_dir: str | None, command: str, erasure: Erasure) -> None:
    """One audit record for an erasure made from the command line, in the audit log a server
    on the same data folder writes (DATA_DIR/audit/audit-YYYY-MM-DD.jsonl)."""
    from souverain.audit import AuditLog
    from souverain.paths import audit_dir

    log = AuditLog(audit_dir(Path(data_dir).expanduser() if data_dir else None))
    try:
        log.submit({"start": time.time(), "request_id": f"cli-{uuid.uuid4().hex}",
                    "method": "CLI", "route": command, "status": 0, "latency_s": 0.0,
                    "client_ip": None, "note": {"key_name": "cli", "erased": erasure.audit()}})
    finally:
        log.close()


library_app = typer.Typer(
    help="Document libraries on this machine: add files and folders (txt, md, html, pdf, docx), "
         "search them, and ground answers in them (`souverain ask`, the server's Libraries API "
         "and its document_library tool use the same libraries).\n\n"
         "Quick start:\n\n"
         "  souverain library create policies\n\n"
         "  souverain library add policies ./hr-handbook ./contracts/2024.pdf --tag hr\n\n"
         "  souverain library search policies \"notice period for managers\"",
    no_args_is_help=True)


@library_app.command("create")
def library_create(
    name: str = typer.Argument(..., help="A name unique on this machine, e.g. policies."),
    description: str | None = typer.Option(None, "--description", "-d",
                                              help="What the library holds (shown in lists)."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Create an empty library; then add documents with `souverain library add NAME PATH...`."""
    with user_errors():
        lib = library_store(data_dir, libraries_dir, libraries_db).create_library(name, description)
        err.print(f"created library {lib.name} ({lib.id}); add documents with "
                  f"`souverain library add {lib.name} PATH...`")


@library_app.command("list")
def library_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """List the libraries: name, id, documents, total size, description."""
    with user_errors():
        libs = library_store(data_dir, libraries_dir, libraries_db).list_libraries()
        if as_json:
            out.print_json(data=[{"id": x.id, "name": x.name, "description": x.description,
                                  "nb_documents": x.nb_documents, "total_size": x.total_size,
                                  "created_at": x.created_at.isoformat(),
                                  "updated_at": x.updated_at.isoformat()} for x in libs])
            return
        if not libs:
            err.print("no libraries yet; create one with `souverain library create NAME`")
            return
        table = Table("name", "id", "documents", "size", "description", title_justify="left")
        for x in libs:
            table.add_row(x.name, x.id, str(x.nb_documents), human_bytes(x.total_size),
                          x.description or "")
        out.print(table)


@library_app.command("add")
def library_add(
    library: str = LibraryArg,
    paths: list[Path] = typer.Argument(..., help="Files and folders (walked recursively; "
                                                 "hidden files skipped)."),
    tag: list[str] = typer.Option([], "--tag", "-t",
                                  help="Tag the documents (repeatable); search can filter on it."),
    max_mib: float = typer.Option(100.0, "--max-mib", min=0.001,
                                  help="Skip (and report) files larger than this."),
    allowed_root: list[Path] = typer.Option(
        [], "--allowed-root",
        help="Refuse any path (after resolving symlinks) outside these folders (repeatable). "
             "Default: $SOUVERAIN_ALLOWED_ROOTS (':'-separated) if set, else no restriction."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Add files and folders to a library (parsed, cut, embedded and indexed locally).

    Resumable: files already added with the same content are skipped, so after Ctrl-C just run
    the same command again. A file whose content changed replaces its previous version. Files
    that cannot be read (corrupt, scanned PDF without text, too large) are listed at the end
    and the exit code is 1; the others are added.

    Examples:
      souverain library add policies ./hr-handbook --tag hr
      souverain library add policies contract.pdf notes.md
    """
    with user_errors():
        from souverain.rag.ingest import ingest_paths

        store = library_store(data_dir, libraries_dir, libraries_db)
        store.get_library(library)  # an unknown library fails before the bar appears
        with Progress(TextColumn("[bold]adding[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("files · {task.description}"), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("", total=None)

            def progress(done: int, total: int, path: Path | None) -> None:
                bar.update(task, completed=done, total=total,
                           description=path.name if path else "indexing")

            roots = list(allowed_root) or [
                Path(p) for p in os.environ.get("SOUVERAIN_ALLOWED_ROOTS", "").split(":") if p]
            report = ingest_paths(store, library, paths, tags=tag, progress=progress,
                                  allowed_roots=roots or None,
                                  max_bytes=int(max_mib * (1 << 20)))
        for path, why in report.failed:
            err.print(f"[yellow]skipped[/] {why if str(path.name) in why else f'{path}: {why}'}")
        err.print(f"{library}: {report.summary()}")
        if report.failed:
            raise typer.Exit(1)


@library_app.command("search")
def library_search(
    library: str = LibraryArg,
    query: str = typer.Argument(..., help="What to look for, in plain words."),
    k: int = typer.Option(5, "-k", min=1, max=100, help="Number of passages."),
    mode: str = typer.Option("hybrid", "--mode",
                             help="hybrid (meaning + exact words, the default), vector "
                                  "(meaning only) or text (BM25 words only)."),
    tag: list[str] = typer.Option([], "--tag", "-t",
                                  help="Only documents with one of these tags (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Find the passages of a library that best match a query.

    Prints rank, score, document, page / section and a snippet. `similarity` is the cosine of
    query and passage: below ~0.3 the passage is probably unrelated.

    Example:
      souverain library search policies "notice period for managers" -k 3
    """
    with user_errors():
        hits = library_store(data_dir, libraries_dir, libraries_db).search([library], query, k=k, tags=tag or None,
                                               mode=mode)  # type: ignore[arg-type]
        if as_json:
            out.print_json(data=[{"rank": i + 1, "score": h.score, "similarity": h.vector_score,
                                  "bm25": h.text_score, "document_id": h.document_id,
                                  "document": h.document_name, "page": h.page,
                                  "heading": h.heading, "start": h.start, "end": h.end,
                                  "chunk_id": h.chunk_id, "text": h.text}
                                 for i, h in enumerate(hits)])
            return
        if not hits:
            err.print(f"nothing found in {library}")
            return
        for i, h in enumerate(hits):
            where = " · ".join(x for x in (f"page {h.page}" if h.page else "",
                                           f"§ {h.heading}" if h.heading else "") if x)
            snippet = " ".join(h.text.split())
            snippet = snippet if len(snippet) <= 300 else snippet[:297] + "..."
            out.print(f"[bold]{i + 1}.[/] {h.score:.3f} (similarity {h.vector_score:.2f})  "
                      f"[bold]{h.document_name}[/]{'  ' + where if where else ''}",
                      markup=True, highlight=False)
            out.print(f"   {snippet}", markup=False)


@library_app.command("docs")
def library_docs(
    library: str = LibraryArg,
    search: str | None = typer.Option(None, "--search", "-s",
                                         help="Only names containing this."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """List a library's documents: id, name, status, pages, passages, size, error."""
    with user_errors():
        store = library_store(data_dir, libraries_dir, libraries_db)
        docs, total = store.list_documents(library, search=search, limit=1_000_000)
        if as_json:
            out.print_json(data=[{"id": d.id, "name": d.name, "status": d.status,
                                  "error": d.error, "mime_type": d.mime_type, "size": d.size,
                                  "hash": d.hash, "number_of_pages": d.number_of_pages,
                                  "nb_chunks": d.nb_chunks,
                                  "tokens_processing_total": d.tokens_processing_total,
                                  "tags": d.tags, "source_path": d.source_path,
                                  "created_at": d.created_at.isoformat()} for d in docs])
            return
        table = Table("name", "id", "status", "pages", "passages", "size", "tags",
                      title=f"{total} documents", title_justify="left")
        for d in docs:
            status = d.status if d.status != "error" else f"[red]error[/]: {d.error}"
            table.add_row(d.name, d.id, status, str(d.number_of_pages or ""), str(d.nb_chunks),
                          human_bytes(d.size), ",".join(d.tags))
        out.print(table)


@library_app.command("remove")
def library_remove(
    library: str = LibraryArg,
    document: str = typer.Argument(..., help="Document id or name (see `souverain library "
                                             "docs`)."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Remove one document (its passages, stored copy and extracted text) from a library;
    recorded in the audit log."""
    with user_errors():
        store = library_store(data_dir, libraries_dir, libraries_db)
        doc = store.get_document(library, document)
        erasure = store.delete_document(doc.library_id, doc.id)
        store.purge()
        audit_erasure(data_dir, "souverain library remove", erasure)
        err.print(f"removed {doc.name} ({doc.id}): {erasure.chunks} passages, "
                  f"{human_bytes(erasure.bytes)} of stored files")


@library_app.command("delete")
def library_delete(
    library: str = LibraryArg,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Delete a library with all its documents and passages (asks first unless --yes);
    recorded in the audit log."""
    with user_errors():
        store = library_store(data_dir, libraries_dir, libraries_db)
        lib = store.get_library(library)
        if not yes and not typer.confirm(f"Delete library {lib.name} and its "
                                         f"{lib.nb_documents} documents?"):
            raise typer.Exit(1)
        erasure = store.delete_library(lib.id)
        store.purge()
        audit_erasure(data_dir, "souverain library delete", erasure)
        err.print(f"deleted library {lib.name}: {len(erasure.document_ids)} documents, "
                  f"{erasure.chunks} passages, {human_bytes(erasure.bytes)} of stored files")


@library_app.command("verify")
def library_verify(
    fix: bool = typer.Option(False, "--fix",
                             help="Delete orphan passages and files, finish interrupted "
                                  "deletions, and process again the documents whose passages "
                                  "or text do not match."),
    data_dir: str | None = DataDirOpt,
    libraries_dir: str | None = LibrariesDirOpt,
    libraries_db: str | None = LibrariesDbOpt,
) -> None:
    """Check that the passages (vector and full-text index) and the stored files agree with
    the documents' records: nothing of a deleted document left, nothing missing.

    Exit code: 0 when everything agrees (with --fix: once fixed), 1 when something does not
    (the table says what, and what to do), 2 on an error.

    Example:
      souverain library verify --fix
    """
    with user_errors():
        store = library_store(data_dir, libraries_dir, libraries_db)
        report = store.verify(fix=fix)
        if fix:
            from souverain.errors import RAGError

            for i, (lib_id, doc_id) in enumerate(report.reprocess):
                err.print(f"processing again {i + 1}/{len(report.reprocess)}: {doc_id}")
                try:
                    doc = store.process_document(lib_id, doc_id)
                except RAGError as exc:  # deleted meanwhile
                    err.print(f"[yellow]skipped[/] {exc}")
                    continue
                if doc.status == "error":
                    err.print(f"[yellow]failed[/] {doc.error}")
            store.purge()
            after = store.verify()
        else:
            after = report
        table = Table("check", "found", "what to do", title_justify="left",
                      title=f"{report.documents} documents, {report.chunks} passages")
        for check, n, hint in report.problems():
            table.add_row(check, str(n), hint)
        if report.problems():
            out.print(table)
        if after.consistent:
            err.print("consistent: the passages and the stored files match the documents"
                      + (" (after the fixes above)" if report.problems() else ""))
            return
        err.print("[yellow]not consistent[/]: "
                  + ("some problems remain (see above)" if fix
                     else "run `souverain library verify --fix` to repair what can be"))
        raise typer.Exit(1)
