"""Document libraries: metadata in SQL (SQLite or PostgreSQL), chunks and vectors in LanceDB.

Layout under ``root`` (default ``paths.libraries_dir()``)::

    meta.sqlite         libraries and documents (library_db.py; the default metadata database:
                        `LibraryStore`'s ``db`` may name another, e.g. a shared PostgreSQL)
    owners/<token>.lock the liveness of each process that owns work here (`OwnerLock`)
    lance/chunks.lance  one table for every library's chunks (text, position, vector, tags;
                        written and indexed by chunk_table.py)
    files/<doc_id>      the uploaded bytes, so processing can run (or re-run) later
    files/<doc_id>.txt  the extracted text, for `document_text`

Writing a document's chunks is ONE LanceDB commit (the chunks stream through a
RecordBatchReader: bounded memory, and a crash or Ctrl-C leaves no partial document). A new
version of a document (same name, other bytes) is a new document; the old one and its chunks
are deleted only after the new one is done, so a library never loses a document to a failed
update.

Search (see `LibraryStore.search` and search.py) pushes every filter down to LanceDB as a
`where` clause applied before the top-k (prefilter), so filters never starve the result.

Erasure: the metadata is the source of truth. Deleting a document (or a library) first deletes
its rows and records the erasure (one SQLite transaction), then its chunks and files, then the
record; an erasure a crash interrupted is finished by `finish_erasures` (the server runs it at
start). An ingestion checks its document's row between every step (parse, each embedding
batch, before and after its one commit, after writing the text) and again when it marks the
document done (an UPDATE that must find the row): whichever of the two sides runs last sees the
other's writes and removes them, so a deleted document never survives a race. Search keeps
only hits whose document row exists and is 'done'. `purge` rewrites the table's files without
the deleted rows and drops old table versions, so erased text leaves the disk too.

Several processes (servers, the CLI) may share one ``root`` and one metadata database: each
store that queues or ingests a document, or erases, owns that work under its token (a
``library_owners`` row with a heartbeat, and an `OwnerLock` under ``owners/``). An ingestion is
claimed by compare-and-set and checks at each stage that it still owns its document; at start
a server takes over only the documents and erasures whose owner is dead (`unfinished`,
`finish_erasures`): its lock free (same host), or its heartbeat older than `STALE_AFTER_S`.
LanceDB commits concurrent writes itself (appends and deletes are rebased); the commits it
gives up on (a compaction preempted by another process's delete) are retried
(`chunk_table.retry_conflicts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa

from souverain import paths
from souverain.errors import RAGError, SouverainError
from souverain.paths import OwnerLock
from souverain.rag import chunk_table
from souverain.rag.chunk_table import retry_conflicts, sql_str
from souverain.rag.library_db import (
    DocumentInfo,
    LibraryDB,
    LibraryInfo,
    NameTaken,
    default_url,
    now_iso,
)
from souverain.rag.search import (
    Candidates,
    Hit,
    Mode,
    text_candidates,
    vector_candidates,
    where_clause,
)

if TYPE_CHECKING:
    from souverain.rag.embed import Embedder
    from souverain.rag.parse import ParsedDocument
    from souverain.rag.verify import VerifyReport

log = logging.getLogger(__name__)

TABLE = "chunks"
# Table versions younger than this are kept by `purge`: a search or an ingestion still reading
# one must not lose its files under it. Erased text leaves the disk at the first purge that
# runs more than this long after the erasure (the server schedules one).
PURGE_KEEP = timedelta(seconds=30)
# The stages of `process_document` at which it checks that its document still exists (and
# calls `LibraryStore.on_stage`, if set, right after the check passes).
STAGES = ("parse", "embed", "commit", "committed", "text")
# A store with work writes its heartbeat this often; an owner on another host whose heartbeat
# is older than STALE_AFTER_S is presumed dead (on this host, its lock file says at once).
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


class LibraryNotFound(RAGError):
    """No library with that id or name."""


class DocumentNotFound(RAGError):
    """No document with that id (or name) in the library."""


class LibraryExists(RAGError):
    """Another library has that name (names are unique): a conflict, not a bad request."""


class DocumentBusy(RAGError):
    """Another live process is ingesting the document (or has it queued)."""


class _Stop(Exception):
    """An ingestion stops: its document was deleted, the store is shutting down, or another
    process took the document over (this one was presumed dead)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why  # "deleted" | "interrupted" | "lost"


@dataclass(frozen=True)
class Erasure:
    """What a deletion removed: for the audit log (`audit`) and the CLI's message."""

    library_id: str
    document_ids: list[str]
    chunks: int  # rows deleted from the chunk table
    bytes: int  # bytes of stored files (uploads and extracted texts) removed

    def audit(self) -> dict[str, Any]:
        return {"library_id": self.library_id, "document_ids": list(self.document_ids),
                "chunks": self.chunks, "bytes": self.bytes}


def _deleted_rows(result: Any) -> int:
    """Rows a LanceDB ``delete`` removed (its `DeleteResult`; 0 where it says nothing)."""
    return int(getattr(result, "num_deleted_rows", 0) or 0)


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("chunk_id", pa.string()),
            ("library_id", pa.string()),
            ("document_id", pa.string()),
            ("document_name", pa.string()),
            ("text", pa.string()),
            ("embed_text", pa.string()),
            ("page", pa.int32()),
            ("heading", pa.string()),
            ("start", pa.int64()),
            ("end", pa.int64()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("tags", pa.list_(pa.string())),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )



class LibraryStore:
    """Document libraries on this machine. Thread-safe: the HTTP server calls it from worker
    threads (SQL: a pooled connection per transaction; LanceDB: its own MVCC commits)."""

    def __init__(self, root: Path | None = None, embedder: Embedder | str | None = None,
                 db: LibraryDB | str | None = None):
        """`embedder`: a loaded `Embedder`, or a model name/path (loaded on first use, like
        the default bundled one): listing and reading libraries never wait for a model load.
        `db`: the metadata database (an open `LibraryDB` or its URL; default: ``meta.sqlite``
        under ``root``); a bad or unreachable one raises `RAGError`."""
        self.root = Path(root) if root is not None else paths.libraries_dir()
        self.files = self.root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._embed_model = embedder if isinstance(embedder, str) else None
        self._embedder = None if isinstance(embedder, str) else embedder
        self._lock = threading.RLock()  # lazy init, index maintenance
        self._db: Any = None  # the LanceDB connection
        self._table: Any = None
        self._meta = db if isinstance(db, LibraryDB) else LibraryDB(db or default_url(self.root))
        self.owners_dir = self.root / "owners"
        self._owner: OwnerLock | None = None  # taken with the first work this store owns
        self._beating = threading.Event()  # set: the heartbeat thread stops
        self._stopping = threading.Event()  # `interrupt`: ingestions stop at their next check
        # called as on_stage(stage, document_id) at each of STAGES once the document is known
        # to exist (tests pause an ingestion there to delete its document at that point)
        self.on_stage: Callable[[str, str], None] | None = None

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    from souverain.rag.embed import get_embedder

                    self._embedder = get_embedder(self._embed_model)
        return self._embedder

    def close(self) -> None:
        """Close every database connection and give up this store's ownership (its queued
        documents and unfinished erasures are anybody's); the store is unusable afterwards."""
        self._beating.set()
        if self._owner is not None:
            try:
                self._meta.release_queued(self._owner.token)
                self._meta.drop_owner(self._owner.token)
            finally:
                self._owner.release()
        self._meta.close()

    def interrupt(self) -> None:
        """Make every running ingestion stop at its next check, leaving its document 'todo'
        (processed again at the next start, by this server or another): a server stopping
        does not wait for them."""
        self._stopping.set()
        if self._owner is not None:
            self._meta.release_queued(self._owner.token)

    # -- ownership (several processes on one set of libraries) -----------------------------------

    @property
    def token(self) -> str:
        """This store's owner token: taken on first use (an `OwnerLock` under ``owners/``, a
        ``library_owners`` row) and kept alive by a heartbeat thread until `close`."""
        if self._owner is None:
            with self._lock:
                if self._owner is None:
                    lock = OwnerLock(self.owners_dir)
                    self._meta.register_owner(lock.token, socket.gethostname(), os.getpid())
                    self._owner = lock
                    threading.Thread(target=self._heartbeat, args=(lock.token,), daemon=True,
                                     name="souverain-libraries-heartbeat").start()
        return self._owner.token

    def _heartbeat(self, token: str) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            try:
                self._meta.beat(token, socket.gethostname(), os.getpid())
            except Exception:  # the database is away for a moment: the next beat tries again
                log.warning("libraries heartbeat failed", exc_info=True)

    def alive(self, token: str) -> bool:
        """Whether the owner ``token`` is alive: this store; on this host, its lock file (the
        kernel's word, whatever its heartbeat); elsewhere, a heartbeat within STALE_AFTER_S.
        No ``library_owners`` row: gone."""
        if self._owner is not None and token == self._owner.token:
            return True
        owner = self._meta.owner(token)
        if owner is None:
            return False
        if owner.host == socket.gethostname():
            held = OwnerLock.held(self.owners_dir, token)
            if held is False:  # (its lock file is gone now: its row goes too, the death known)
                self._meta.drop_owner(token)
            if held is not None:
                return held
        return time.time() - owner.heartbeat_at <= STALE_AFTER_S

    def _mine_or_dead(self, owner: str | None) -> bool:
        return owner is None or owner == self.token or not self.alive(owner)

    def _chunks(self, create: bool = True) -> Any:
        """The LanceDB chunk table (created on the first write), or None if absent."""
        if self._table is not None:
            return self._table
        with self._lock:
            if self._table is None:
                import lancedb

                if self._db is None:
                    # every read sees the latest commit, also another process's (CLI + server)
                    self._db = lancedb.connect(
                        self.root / "lance", read_consistency_interval=timedelta(0)
                    )
                try:
                    self._table = self._db.open_table(TABLE)
                except (ValueError, FileNotFoundError, RuntimeError):  # not created yet
                    pass
                if self._table is None and create:
                    try:
                        self._table = self._db.create_table(
                            TABLE, schema=chunk_schema(self.embedder.dim), exist_ok=True
                        )
                    except Exception:  # another process created it at the same moment
                        self._table = retry_conflicts(lambda: self._db.open_table(TABLE))
        return self._table

    # -- libraries ------------------------------------------------------------------------------

    def create_library(self, name: str, description: str | None = None) -> LibraryInfo:
        name = name.strip()
        if not name:
            raise RAGError("A library needs a non-empty name.")
        try:
            self._meta.insert_library(str(uuid.uuid4()), name, description)
        except NameTaken:
            raise LibraryExists(
                f"A library named {name!r} already exists; pick another name or add "
                "documents to it."
            ) from None
        return self.get_library(name)

    def list_libraries(self) -> list[LibraryInfo]:
        return self._meta.libraries()

    def get_library(self, id_or_name: str) -> LibraryInfo:
        lib = self._meta.library(id_or_name)
        if lib is None:
            raise LibraryNotFound(
                f"No library {id_or_name!r}; `souverain library list` shows "
                "the libraries (create one with `souverain library create`)."
            )
        return lib

    def update_library(
        self, id: str, name: str | None = None, description: str | None = None
    ) -> LibraryInfo:
        lib = self.get_library(id)
        new_name = lib.name if name is None else name.strip()
        if not new_name:
            raise RAGError("A library needs a non-empty name.")
        try:
            self._meta.update_library(
                lib.id, new_name, lib.description if description is None else description
            )
        except NameTaken:
            raise LibraryExists(
                f"A library named {new_name!r} already exists; pick another name."
            ) from None
        return self.get_library(lib.id)

    def delete_library(self, id: str) -> Erasure:
        """Delete a library, its documents, their chunks and files; a running or queued
        ingestion of one of them stops at its next check and leaves nothing behind."""
        lib = self.get_library(id)
        doc_ids = self._meta.delete_library(lib.id, self.token)  # from here on, invisible
        items = [("document", d, lib.id) for d in doc_ids] + [("library", lib.id, lib.id)]
        chunks, nbytes = self._erase(items)
        return Erasure(lib.id, doc_ids, chunks, nbytes)

    # -- documents ------------------------------------------------------------------------------

    def find_document(self, library: str, name: str) -> DocumentInfo | None:
        """The newest document of that name in the library, if any."""
        return self._meta.newest_document(self.get_library(library).id, name)

    def register_document(
        self,
        library: str,
        data: bytes,
        name: str,
        *,
        tags: Iterable[str] = (),
        source_path: str | None = None,
        mime_type: str | None = None,
    ) -> DocumentInfo:
        """Record a document (status 'todo') and keep its bytes for `process_document`.

        Same name and same bytes as a document of the library: that document, unchanged.
        An unsupported file type is refused here (nothing is stored)."""
        from souverain.rag.parse import MIME_TYPES, detect_extension

        lib = self.get_library(library)
        name = name.strip()
        if not name:
            raise RAGError("A document needs a non-empty name.")
        ext = detect_extension(data, name, mime_type)
        digest = hashlib.sha256(data).hexdigest()
        same = self._meta.newest_document(lib.id, name, digest)
        if same is not None:
            return same
        doc_id = str(uuid.uuid4())
        tmp = self.files / f".{doc_id}.part"
        tmp.write_bytes(data)
        tmp.replace(self.files / doc_id)
        now = now_iso()
        try:
            self._meta.insert_document(
                {
                    "id": doc_id,
                    "library_id": lib.id,
                    "name": name,
                    "mime_type": MIME_TYPES[ext],
                    "extension": ext,
                    "size": len(data),
                    "hash": digest,
                    "created_at": now,
                    "updated_at": now,
                    "tags": json.dumps(sorted(set(tags))),
                    "source_path": source_path,
                },
                owner=self.token,  # queued here: another process leaves it alone
            )
        except BaseException:
            self._remove_files(doc_id)
            raise
        return self.get_document(lib.id, doc_id)

    def add_document(
        self,
        library: str,
        data: bytes,
        name: str,
        *,
        tags: Iterable[str] = (),
        source_path: str | None = None,
        mime_type: str | None = None,
    ) -> DocumentInfo:
        """`register_document` then `process_document` (unless already done). A document that
        cannot be read comes back with status 'error' and `error` saying why."""
        doc = self.register_document(
            library, data, name, tags=tags, source_path=source_path, mime_type=mime_type
        )
        if doc.status == "done":
            return doc
        return self.process_document(doc.library_id, doc.id)

    def process_document(
        self, library: str, doc_id: str, parsed: ParsedDocument | None = None
    ) -> DocumentInfo:
        """Parse, chunk, embed and index a registered document; 'done' or 'error' afterwards.
        `parsed`: the document as a caller already parsed it (to validate an upload), so that
        it is not parsed twice.

        The chunks are written in one commit: on any failure none is left behind. Once done,
        older documents of the same name in the library (previous versions) are deleted."""
        from souverain.rag.parse import parse_document

        doc = self.get_document(library, doc_id)
        self._claim(doc)
        table = self._chunks()
        check = self._checkpoint(doc.id)
        try:
            table.delete(f"document_id = {sql_str(doc.id)}")  # leftovers of an interrupted run
            check("parse")
            if parsed is None:
                parsed = parse_document(
                    (self.files / doc.id).read_bytes(), doc.name, doc.mime_type
                )
            n_chunks, n_tokens = chunk_table.write_chunks(
                table, doc, parsed, self.embedder, check
            )
            check("committed")
            (self.files / f"{doc.id}.txt").write_text(parsed.text, encoding="utf-8")
            check("text")
            # the last check: an UPDATE that finds the row still ours, after every write of
            # this run
            if not self._meta.update_document(
                doc.id,
                held_by=self.token,
                status="done",
                error=None,
                number_of_pages=parsed.number_of_pages,
                mime_type=parsed.mime_type,
                extension=parsed.extension,
                nb_chunks=n_chunks,
                tokens_processing_total=n_tokens,
            ):
                raise _Stop("deleted" if self._meta.status(doc.id) is None else "lost")
        except _Stop as stop:
            self._stopped(doc, table, stop.why)
        except Exception as exc:
            holder = self._meta.holder(doc.id)
            if holder is None:  # e.g. its bytes went with the deletion
                self._stopped(doc, table, "deleted")
            if holder[1] != self.token:
                self._stopped(doc, table, "lost")
            self._processing_failed(doc, table, exc)
            return self.get_document(doc.library_id, doc.id)
        for old_id in self._meta.older_versions(doc):
            self._meta.delete_document(old_id, self.token)
            self._erase([("document", old_id, doc.library_id)])
        with self._lock:
            chunk_table.maintain_fts(table)
        return self.get_document(doc.library_id, doc.id)

    def _claim(self, doc: DocumentInfo) -> None:
        """Own ``doc``'s ingestion ('in_progress'), unless another live process has it queued
        or under way (`DocumentBusy`); compare-and-set, so of two processes one wins."""
        while True:
            seen = self._meta.holder(doc.id)
            if seen is None:
                raise self._deleted_meanwhile(doc)
            status, owner = seen
            if status in ("todo", "in_progress") and not self._mine_or_dead(owner):
                raise DocumentBusy(
                    f"Document {doc.name!r} ({doc.id}) is being processed by another server "
                    "sharing these libraries.")
            if self._meta.claim_document(doc.id, self.token, seen):
                return

    def _checkpoint(self, doc_id: str) -> Callable[[str], None]:
        """``check(stage)``: raises `_Stop` when the document is gone, no longer this store's
        (or the store is stopping), then calls `on_stage`."""

        def check(stage: str) -> None:
            if self._stopping.is_set():
                raise _Stop("interrupted")
            holder = self._meta.holder(doc_id)
            if holder is None:
                raise _Stop("deleted")
            if holder[1] != self.token:
                raise _Stop("lost")
            if self.on_stage is not None:
                self.on_stage(stage, doc_id)

        return check

    def _stopped(self, doc: DocumentInfo, table: Any, why: str) -> NoReturn:
        """An ingestion stopped early. Deleted: remove whatever this run wrote (chunks, text;
        the upload itself is the erasure's to remove and count) and raise `DocumentNotFound`.
        Interrupted: drop this run's chunks and leave the document 'todo' (anybody's) for the
        next start. Lost (another process took it over, this one presumed dead): touch
        nothing, the chunks are the new owner's."""
        if why == "lost":
            raise DocumentBusy(
                f"Document {doc.name!r} ({doc.id}) was taken over by another server sharing "
                "these libraries; this server left it to it.")
        table.delete(f"document_id = {sql_str(doc.id)}")
        if why == "interrupted":
            self._meta.update_document(doc.id, held_by=self.token, status="todo", error=None)
            raise DocumentNotFound(
                f"Processing of {doc.name!r} was interrupted; it is queued again at the next "
                "start."
            )
        self._remove_files(doc.id, upload=False)
        raise self._deleted_meanwhile(doc)

    @staticmethod
    def _deleted_meanwhile(doc: DocumentInfo) -> DocumentNotFound:
        return DocumentNotFound(
            f"Document {doc.name!r} ({doc.id}) was deleted while it was being processed; "
            "nothing of it is kept."
        )

    def _processing_failed(self, doc: DocumentInfo, table: Any, exc: Exception) -> None:
        """Drop whatever chunks the failed run left and mark the document 'error', with a
        message saying why (a traceback in the log when the failure is not a user error)."""
        if isinstance(exc, SouverainError):
            message = str(exc)
        else:
            log.exception("processing %s (%s) failed", doc.name, doc.id)
            message = (
                f"{doc.name}: processing failed ({type(exc).__name__}: {exc}); "
                "retry, and report it if it persists."
            )
        try:
            table.delete(f"document_id = {sql_str(doc.id)}")
        finally:
            self._meta.update_document(
                doc.id, held_by=self.token, status="error", error=message, nb_chunks=0,
                tokens_processing_total=0,
            )

    def list_documents(
        self,
        library: str,
        search: str | None = None,
        offset: int = 0,
        limit: int = 100,
        *,
        sort_by: str = "created_at",
        descending: bool = True,
    ) -> tuple[list[DocumentInfo], int]:
        """Documents of a library, newest first unless `sort_by` (created_at, name, size) and
        `descending` say otherwise; `search` matches a part of the name."""
        if sort_by not in ("created_at", "name", "size"):
            raise RAGError(f"Cannot sort documents by {sort_by!r}; use created_at, name or size.")
        order = f"{sort_by} {'DESC' if descending else 'ASC'}"
        lib = self.get_library(library)
        return self._meta.documents(lib.id, search, offset, limit, order)

    def unfinished(self) -> list[tuple[str, str]]:
        """(library id, document id) of every document 'todo' or 'in_progress' that no live
        process owns (left so by a stopped server, or queued by this store), oldest first;
        those another live server has queued or is ingesting are its own."""
        alive: dict[str, bool] = {}
        out = []
        for lib_id, doc_id, owner in self._meta.unfinished():
            if owner is not None and owner not in alive:
                alive[owner] = not self._mine_or_dead(owner)
            if owner is None or not alive[owner]:
                out.append((lib_id, doc_id))
        self._meta.prune_owners(self.alive)
        return out

    def get_document(self, library: str, doc_id: str) -> DocumentInfo:
        """A document by id (or, failing that, by name) in a library."""
        lib = self.get_library(library)
        doc = self._meta.document(lib.id, doc_id)
        if doc is None:
            raise DocumentNotFound(
                f"No document {doc_id!r} in library {lib.name!r}; "
                f"`souverain library docs {lib.name}` lists its documents."
            )
        return doc

    def document_text(self, library: str, doc_id: str) -> str:
        doc = self.get_document(library, doc_id)
        path = self.files / f"{doc.id}.txt"
        if doc.status != "done" or not path.is_file():
            raise RAGError(
                f"Document {doc.name!r} has no text yet (status {doc.status}"
                f"{': ' + doc.error if doc.error else ''})."
            )
        return path.read_text(encoding="utf-8")

    def document_bytes(self, library: str, doc_id: str) -> bytes:
        doc = self.get_document(library, doc_id)
        return (self.files / doc.id).read_bytes()

    def update_document(
        self,
        library: str,
        doc_id: str,
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> DocumentInfo:
        """Rename a document and/or replace its tags (its chunks follow, for search filters)."""
        doc = self.get_document(library, doc_id)
        new_name = doc.name if name is None else name.strip()
        if not new_name:
            raise RAGError("A document needs a non-empty name.")
        new_tags = doc.tags if tags is None else sorted(set(tags))
        values: dict[str, Any] = {}
        if new_name != doc.name:
            values["document_name"] = new_name
        if new_tags != doc.tags:
            values["tags"] = new_tags
        table = self._chunks(create=False)
        if values and table is not None and doc.nb_chunks:
            table.update(where=f"document_id = {sql_str(doc.id)}", values=values)
        self._meta.update_document(doc.id, name=new_name, tags=json.dumps(new_tags))
        return self.get_document(doc.library_id, doc.id)

    def reset_document(self, library: str, doc_id: str) -> DocumentInfo:
        """Mark a document 'todo' again, for `process_document` to redo (its bytes are kept;
        search leaves it out until it is 'done' again)."""
        doc = self.get_document(library, doc_id)
        self._meta.update_document(doc.id, status="todo", error=None)
        return self.get_document(doc.library_id, doc.id)

    def delete_document(self, library: str, doc_id: str) -> Erasure:
        """Delete a document, its chunks, its stored bytes and extracted text; a running or
        queued ingestion of it stops at its next check and leaves nothing behind."""
        doc = self.get_document(library, doc_id)
        # from here on, invisible (search, lists, API)
        self._meta.delete_document(doc.id, self.token)
        chunks, nbytes = self._erase([("document", doc.id, doc.library_id)])
        return Erasure(doc.library_id, [doc.id], chunks, nbytes)

    def _erase(self, items: list[tuple[str, str, str]]) -> tuple[int, int]:
        """Delete the chunks and files of erasures whose rows are already gone (kind, id,
        library id), then forget them; returns (chunk rows deleted, file bytes removed).
        Idempotent: `finish_erasures` runs it again after a crash."""
        table = self._chunks(create=False)
        libraries = {i for kind, i, _ in items if kind == "library"}
        documents = [i for kind, i, lib in items if kind == "document" and lib not in libraries]
        chunks = nbytes = 0
        if table is not None:
            for lib_id in libraries:
                chunks += _deleted_rows(table.delete(f"library_id = {sql_str(lib_id)}"))
            for n in range(0, len(documents), 500):
                ids = ", ".join(sql_str(i) for i in documents[n : n + 500])
                chunks += _deleted_rows(table.delete(f"document_id IN ({ids})"))
        for kind, i, _ in items:
            if kind == "document":
                nbytes += self._remove_files(i)
        self._meta.erasure_done(i for _, i, _ in items)
        return chunks, nbytes

    def finish_erasures(self, mine: bool = True) -> Erasure | None:
        """Finish the erasures a crash interrupted (their rows are gone, their chunks or files
        may not be): those whose owner is dead, and (``mine``) this store's own left
        unfinished; never another live server's, under way. None when there were none."""
        if not self._meta.pending_erasures():
            return None
        items = self._meta.claim_erasures(self.token, self.alive, own=mine)
        if not items:
            return None
        chunks, nbytes = self._erase(items)
        docs = [i for kind, i, _ in items if kind == "document"]
        log.info("finished %d interrupted erasures (%d chunks, %d bytes)", len(items), chunks,
                 nbytes)
        return Erasure(items[0][2], docs, chunks, nbytes)

    def interrupted_erasures(self) -> int:
        """Erasures not finished whose owner is gone (or this store): not one a live server
        is doing right now."""
        return sum(1 for *_, owner in self._meta.pending_erasures()
                   if self._mine_or_dead(owner))

    def _remove_files(self, doc_id: str, upload: bool = True) -> int:
        """Remove a document's stored bytes (unless not ``upload``) and extracted text;
        returns the bytes removed."""
        removed = 0
        paths = [self.files / f"{doc_id}.txt"]
        if upload:
            paths += [self.files / doc_id, self.files / f".{doc_id}.part"]
        for p in paths:
            try:
                size = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            removed += size
        return removed

    def purge(self, keep: timedelta = PURGE_KEEP) -> None:
        """Rewrite the chunk table's files without deleted rows and drop the table versions
        (and the files only they use) older than ``keep``: until then, deleted chunks are
        invisible but their text is still on disk in older versions."""
        table = self._chunks(create=False)
        if table is None:
            return
        import warnings

        with self._lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanceDB warns about keep=0 and concurrent readers
            retry_conflicts(lambda: table.optimize(cleanup_older_than=keep))

    def verify(self, fix: bool = False) -> VerifyReport:
        """Check that the chunk table and the stored files agree with the metadata; with
        ``fix``, remove orphans, finish interrupted erasures and reset documents whose chunks
        do not match to 'todo' (see verify.py)."""
        from souverain.rag.verify import verify

        return verify(self, fix)

    # -- indexes and search ---------------------------------------------------------------------

    def optimize(self, vector_index: bool | None = None) -> None:
        """Merge waiting rows into every index and compact the table's files. `vector_index`:
        True builds (or rebuilds) an IVF-PQ index, None builds one when the table holds at
        least VECTOR_INDEX_MIN_ROWS chunks and has none."""
        table = self._chunks(create=False)
        if table is None:
            return
        with self._lock:
            chunk_table.optimize(table, lambda: self.embedder.dim, vector_index)

    def search(
        self,
        libraries: Sequence[str],
        query: str,
        k: int = 5,
        *,
        document_ids: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        mode: Mode = "hybrid",
    ) -> list[Hit]:
        """The `k` chunks of `libraries` (ids or names) best matching `query`.

        - vector: nearest chunks by cosine of the embeddings; `score` = cosine.
        - text: BM25 over the chunks' text (heading path included); `score` = BM25.
        - hybrid: 4k vector candidates and 4k BM25 candidates, merged by reciprocal-rank
          fusion (RRF, k=60: robust to the two scales) into a pool of 4k, then reranked by
          ``0.85 * cosine + 0.15 * bm25 / best_bm25_of_the_pool`` (see search.py for why).

        Filters (all optional, combined with AND): `document_ids`; `tags` (a chunk matches if
        its document has ANY of them); `since`/`until` (inclusive bounds on the document's
        upload time). `vector_score` is the exact cosine in every mode."""
        library_ids = self._search_scope(libraries, query, k, mode)
        table = self._chunks(create=False)
        if table is None:
            return []
        n_cand = max(4 * k, 20)
        qvec = self.embedder.embed_query(query)
        # the metadata decides what exists: chunks of a document deleted, or not (yet) done,
        # are dropped and excluded from the next round, so they never show nor starve the hits
        excluded: set[str] = set()
        for _ in range(3):
            where = where_clause(library_ids, document_ids, tags, since, until, excluded)
            found = Candidates()
            if mode in ("hybrid", "vector"):
                found.add_vector(vector_candidates(table, qvec, where, n_cand))
            if mode in ("hybrid", "text") and chunk_table.ensure_fts(table, self._lock):
                found.add_text(text_candidates(table, query, where, n_cand))
            stale = found.document_ids() - self._meta.done_ids(found.document_ids())
            if not stale:
                break
            excluded |= stale
        found.drop(stale)
        if not found.rows:
            return []
        cosine = found.cosines(qvec)
        order, scores = found.rank(cosine, mode, n_cand)
        return found.hits(order[:k], scores, cosine)

    def _search_scope(self, libraries: Sequence[str], query: str, k: int, mode: str) -> list[str]:
        """The ids of the libraries to search, once the arguments are checked."""
        if mode not in ("hybrid", "vector", "text"):
            raise RAGError(f"Unknown search mode {mode!r}; use hybrid, vector or text.")
        if not query or not query.strip():
            raise RAGError("The search query is empty; give some words to look for.")
        if k < 1:
            raise RAGError(f"k={k}: ask for at least one result.")
        library_ids = list(dict.fromkeys(self.get_library(x).id for x in libraries))
        if not library_ids:
            raise RAGError("Name at least one library to search.")
        return library_ids
