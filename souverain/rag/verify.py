"""`LibraryStore.verify`: do the chunk table and the stored files agree with the metadata?

The metadata (``meta.sqlite``, or the shared ``--libraries-db``) is the source of truth. Inconsistent are: chunks whose document
(or library) row does not exist, 'done' documents whose chunk count differs from their rows in
the table or whose extracted text is missing, files under ``files/`` that belong to no
document, documents whose uploaded bytes are missing, and erasures a crash interrupted (not
those another live server sharing the libraries is doing right now).

``fix`` removes the orphans (chunks, files), finishes the erasures and resets 'done' documents
with missing or miscounted chunks (or missing text) to 'todo', their chunks dropped: whoever
called it processes them again (the CLI does at once; a server at its next start). A document
whose bytes are gone cannot be rebuilt: it is reported, for the user to upload it again or
remove it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from souverain.rag.chunk_table import sql_str

if TYPE_CHECKING:
    from souverain.rag.library_db import DocumentInfo
    from souverain.rag.store import LibraryStore

# A file under files/ with no document row, younger than this, may be an upload being
# registered right now (its bytes are written just before its row): not an orphan yet.
IN_FLIGHT_S = 60.0


@dataclass
class VerifyReport:
    """What `LibraryStore.verify` found (and, with ``fix``, what it did)."""

    documents: int = 0
    chunks: int = 0
    orphan_chunks: dict[str, int] = field(default_factory=dict)  # document id -> rows
    miscounted: list[tuple[str, str, int, int]] = field(default_factory=list)
    # (library id, document id, chunks in the metadata, rows in the table), 'done' documents
    missing_text: list[tuple[str, str]] = field(default_factory=list)  # (library, document)
    missing_bytes: list[tuple[str, str]] = field(default_factory=list)  # (library, document)
    orphan_files: list[str] = field(default_factory=list)  # names under files/
    pending_erasures: int = 0
    fixed: bool = False
    reprocess: list[tuple[str, str]] = field(default_factory=list)  # reset to 'todo' by fix

    @property
    def consistent(self) -> bool:
        return not (self.orphan_chunks or self.miscounted or self.missing_text
                    or self.missing_bytes or self.orphan_files or self.pending_erasures)

    def problems(self) -> list[tuple[str, int, str]]:
        """(check, count, what it means / what --fix does), for every failed check."""
        out = []
        if self.orphan_chunks:
            out.append(("chunks without a document", sum(self.orphan_chunks.values()),
                        f"of {len(self.orphan_chunks)} deleted documents; --fix deletes them"))
        if self.miscounted:
            out.append(("done documents with wrong chunks", len(self.miscounted),
                        "--fix processes them again"))
        if self.missing_text:
            out.append(("done documents without their text", len(self.missing_text),
                        "--fix processes them again"))
        if self.missing_bytes:
            out.append(("documents whose stored file is missing", len(self.missing_bytes),
                        "upload them again or remove them (`souverain library remove`)"))
        if self.orphan_files:
            out.append(("files without a document", len(self.orphan_files),
                        "--fix deletes them"))
        if self.pending_erasures:
            out.append(("interrupted erasures", self.pending_erasures, "--fix finishes them"))
        return out


def verify(store: LibraryStore, fix: bool = False) -> VerifyReport:
    """See the module docstring."""
    meta = store._meta
    pending = store.interrupted_erasures()
    if fix and pending:
        store.finish_erasures()
    docs = {d.id: d for d in meta.all_documents()}
    libraries = meta.library_ids()
    report = VerifyReport(documents=len(docs), pending_erasures=0 if fix else pending)
    rows = _chunk_rows(store)
    report.chunks = sum(rows.values())
    per_doc: Counter[str] = Counter()
    for (lib_id, doc_id), n in rows.items():
        d = docs.get(doc_id)
        if d is None or d.library_id != lib_id or lib_id not in libraries:
            report.orphan_chunks[doc_id] = report.orphan_chunks.get(doc_id, 0) + n
        else:
            per_doc[doc_id] += n
    for d in docs.values():
        _check_document(store, d, per_doc[d.id], report)
    report.orphan_files = _orphan_files(store, docs)
    if fix:
        _fix(store, docs, report)
    return report


def _chunk_rows(store: LibraryStore) -> Counter[tuple[str, str]]:
    """Rows of the chunk table per (library id, document id)."""
    table = store._chunks(create=False)
    if table is None or table.count_rows() == 0:
        return Counter()
    ids = table.search().select(["library_id", "document_id"]).limit(None).to_arrow()
    counts = ids.group_by(["library_id", "document_id"]).aggregate([([], "count_all")])
    return Counter({(lib, doc): int(n) for lib, doc, n in zip(
        counts["library_id"].to_pylist(), counts["document_id"].to_pylist(),
        counts["count_all"].to_pylist())})


def _check_document(store: LibraryStore, d: DocumentInfo, rows: int,
                    report: VerifyReport) -> None:
    if not (store.files / d.id).is_file():
        report.missing_bytes.append((d.library_id, d.id))
    if d.status != "done":
        return
    if rows != d.nb_chunks:
        report.miscounted.append((d.library_id, d.id, d.nb_chunks, rows))
    elif not (store.files / f"{d.id}.txt").is_file():
        report.missing_text.append((d.library_id, d.id))


def _orphan_files(store: LibraryStore, docs: dict[str, DocumentInfo]) -> list[str]:
    now = time.time()
    out = []
    for p in sorted(store.files.iterdir()):
        doc_id = p.name.removeprefix(".").removesuffix(".part").removesuffix(".txt")
        if doc_id in docs:
            continue
        try:
            if now - p.stat().st_mtime < IN_FLIGHT_S:
                continue
        except FileNotFoundError:  # removed meanwhile
            continue
        out.append(p.name)
    return out


def _fix(store: LibraryStore, docs: dict[str, DocumentInfo], report: VerifyReport) -> None:
    table = store._chunks(create=False)
    if table is not None:
        for doc_id in report.orphan_chunks:
            d = docs.get(doc_id)
            where = f"document_id = {sql_str(doc_id)}"
            if d is not None:  # the document exists, in another library: keep its own rows
                where += f" AND library_id != {sql_str(d.library_id)}"
            table.delete(where)
    for name in report.orphan_files:
        (store.files / name).unlink(missing_ok=True)
    bytes_gone = set(report.missing_bytes)
    for lib_id, doc_id, *_ in report.miscounted + report.missing_text:
        if (lib_id, doc_id) in bytes_gone:
            continue  # cannot be rebuilt: reported
        if table is not None:
            table.delete(f"document_id = {sql_str(doc_id)}")
        if store._meta.update_document(doc_id, status="todo", error=None, nb_chunks=0):
            report.reprocess.append((lib_id, doc_id))
    report.fixed = True
