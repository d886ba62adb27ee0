"""The server's document libraries over `LibraryStore`: the service (store opened on first
use, one ingest worker thread), the request bodies and the JSON shapes of Mistral's Libraries
API (``client.beta.libraries`` in the official SDK); its routes are
`souverain.server.routers.libraries`.

An upload is stored at once and answered with ``process_status: "todo"``; one background
worker thread parses, chunks and embeds it (``in_progress`` -> ``done`` or ``error`` with the
reason). At start (`LibraryService.start`, on a thread: the server does not wait for it), the
erasures a crash interrupted are finished and the documents left unprocessed are queued again.
Deleting a document drops its queued ingestion, and a running one stops at its next check (see
`souverain.rag.store`); a purge some time after an erasure removes the deleted text from the
chunk table's files. Signed URLs do not apply to a server on your own machine and are not
offered.

Several servers may share one set of libraries (``--libraries-dir`` on shared storage,
``--libraries-db`` a shared PostgreSQL): each ingests the documents uploaded through it, and at
start, then every `ADOPT_EVERY_S`, takes over only the documents and erasures whose owner died
(see `souverain.rag.store`), never those another live server has queued or under way.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from souverain.errors import RAGError
from souverain.server.errors import APIError

if TYPE_CHECKING:
    from souverain.rag.store import Erasure, LibraryStore

log = logging.getLogger("souverain.server.libraries")

# How often a server looks for documents and erasures left by a server that died (sharing the
# libraries with this one) and takes them over.
ADOPT_EVERY_S = 60.0

# mistralai's legacy `processing_status` strings next to the current `process_status`
LEGACY_STATUS = {"todo": "Pending", "in_progress": "Running", "done": "Completed",
                  "error": "Failed"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LibraryCreate(_Body):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    chunk_size: int | None = Field(default=None, description=(
        "Accepted (deprecated on La Plateforme); chunks here follow the document's structure "
        "and the embedding model's window."))
    owner_type: Literal["User", "Workspace"] | None = None


class LibraryUpdate(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = None


class LibrarySearch(_Body):
    """souverain: ``POST /v1/libraries/{library_id}/search`` (La Plateforme searches a library
    only through its ``document_library`` tool; the CLI's ``souverain library search`` and the
    console's search need the passages themselves)."""

    query: str = Field(min_length=1, max_length=4000, pattern=r"\S",
                       description="The words to look for (not only spaces).")
    # JSON Schema's integer includes 18.0: lax, so a schema-valid body is not refused
    top_k: int = Field(default=5, ge=1, le=50, strict=False)
    mode: Literal["hybrid", "vector", "text"] = "hybrid"
    document_ids: list[str] | None = Field(default=None, min_length=1,
                                           description="Only these documents.")
    tags: list[str] | None = Field(default=None, min_length=1,
                                   description="Documents with any of these tags.")


def hit_json(hit: Any) -> dict[str, Any]:
    """One search result: the passage, where it is, and its scores (`score` orders them;
    `vector_score` is the cosine, comparable across queries)."""
    return {"chunk_id": hit.chunk_id, "library_id": hit.library_id,
            "document_id": hit.document_id, "document_name": hit.document_name,
            "page": hit.page, "heading": hit.heading, "text": hit.text,
            "start": hit.start, "end": hit.end, "score": float(hit.score),
            "vector_score": float(hit.vector_score),
            "text_score": None if hit.text_score is None else float(hit.text_score)}


class DocumentUpdate(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=500)
    attributes: dict[str, Any] | None = Field(default=None, description=(
        "Stored with the document; a `tags` list of strings here becomes its search tags."))


def _iso(d: datetime | None) -> str | None:
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.isoformat()


def library_json(lib: Any) -> dict[str, Any]:
    return {"id": lib.id, "name": lib.name, "description": lib.description,
            "created_at": _iso(lib.created_at), "updated_at": _iso(lib.updated_at),
            "owner_id": None, "owner_type": "User", "total_size": int(lib.total_size),
            "nb_documents": int(lib.nb_documents), "chunk_size": None}


def document_json(doc: Any) -> dict[str, Any]:
    status = doc.status
    return {"id": doc.id, "library_id": doc.library_id, "hash": doc.hash,
            "mime_type": doc.mime_type, "extension": doc.extension, "size": doc.size,
            "name": doc.name, "created_at": _iso(doc.created_at),
            "last_processed_at": _iso(doc.updated_at) if status in ("done", "error") else None,
            "process_status": status, "processing_status": LEGACY_STATUS.get(status, status),
            "uploaded_by_id": None, "uploaded_by_type": "User",
            "tokens_processing_total": int(doc.tokens_processing_total or 0),
            "number_of_pages": doc.number_of_pages, "summary": None, "url": None,
            "attributes": {"tags": list(doc.tags or []), "chunks": int(doc.nb_chunks or 0),
                           **({"error": doc.error} if doc.error else {})}}


def rag_api_error(exc: RAGError) -> APIError:
    from souverain.rag.store import DocumentNotFound, LibraryExists, LibraryNotFound

    if isinstance(exc, (LibraryNotFound, DocumentNotFound)):
        return APIError(404, str(exc), code="not_found")
    if isinstance(exc, LibraryExists):  # names are unique: a conflict (409), as La Plateforme
        return APIError(409, str(exc), param="name", code="library_exists")
    return APIError(400, str(exc), code="invalid_document")


class LibraryService:
    """The server's document libraries: a `LibraryStore` opened on first use, and one worker
    thread that processes uploads in order (parsing and embedding are CPU-bound; one at a time
    leaves the other cores to generation)."""

    def __init__(self, root: Path | None = None, embed_model: str | None = None,
                 db_url: str | None = None):
        """``root``: the libraries folder (document bytes, chunk table); ``db_url``: the
        metadata database (default: SQLite under ``root``), opened now: a bad or unreachable
        one is a `RAGError` at start, not at the first request."""
        from souverain.paths import libraries_dir
        from souverain.rag.library_db import LibraryDB, default_url

        self.root = root
        self.embed_model = embed_model
        self.db = LibraryDB(db_url or default_url(root or libraries_dir()))
        self._store: LibraryStore | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="souverain-ingest")
        self._queued: dict[str, Future[None]] = {}  # document id -> its queued ingestion
        self._queued_lock = threading.Lock()
        self._purge_timer: threading.Timer | None = None
        self._last_erasure = 0.0
        self._closed = False
        self._adopting = threading.Event()  # set: the periodic take-over stops

    @property
    def store(self) -> LibraryStore:
        with self._lock:
            if self._store is None:
                from souverain.rag.store import LibraryStore

                # the embedder loads on the first upload or search, not to list libraries
                store = LibraryStore(self.root, self.embed_model, self.db)
                try:
                    store.finish_erasures()
                except Exception:  # still recorded (and invisible): the next start retries
                    log.exception("could not finish the interrupted erasures")
                self._requeue(store)
                self._store = store
            return self._store

    def start(self) -> threading.Thread:
        """Open the store on a thread: finish interrupted erasures, queue the documents a
        stopped server left unprocessed, schedule a purge. The server does not wait for it
        (nor for the embedder, which loads when the first of those documents is processed)."""

        def run() -> None:
            try:
                self.store  # noqa: B018 (opening it is the point)
                self._purge_later()
            except Exception:  # the first request that needs them tries again, and says why
                log.exception("could not open the document libraries at start")
            threading.Thread(target=self._adopt_loop, name="souverain-libraries-adopt",
                             daemon=True).start()

        thread = threading.Thread(target=run, name="souverain-libraries-start", daemon=True)
        thread.start()
        return thread

    def _requeue(self, store: LibraryStore) -> None:
        """Documents a stopped server left 'todo' or 'in_progress' are processed again (not
        those another live server sharing the libraries owns)."""
        with self._queued_lock:
            queued = set(self._queued)
        unfinished = [(lib, doc) for lib, doc in store.unfinished() if doc not in queued]
        for library_id, document_id in unfinished:
            self.schedule(library_id, document_id, store)
        if unfinished:
            log.info("queued %d documents left unprocessed", len(unfinished))

    def _adopt_loop(self) -> None:
        while not self._adopting.wait(ADOPT_EVERY_S):
            self._adopt()

    def _adopt(self) -> None:
        """Take over what a server sharing these libraries left when it died: its erasures,
        then its documents."""
        store = self._store
        if store is None or self._closed:
            return
        try:
            store.finish_erasures(mine=False)  # (this server's own are under way)
            self._requeue(store)
        except Exception:
            log.exception("could not take over the work of a stopped server")

    def add_upload(self, library_id: str, data: bytes, name: str, mime: str | None) -> Any:
        """Store an uploaded document and queue its processing (blocking: call it on a worker
        thread). Unsupported, corrupt or empty: a `RAGError` now, and nothing stored."""
        from souverain.rag.parse import parse_document

        store = self.store
        lib = store.get_library(library_id)
        parsed = parse_document(data, name, mime)  # parsed once: to validate, then to ingest
        doc = store.register_document(lib.id, data, name, mime_type=mime)
        if doc.status in ("todo", "in_progress"):
            self.schedule(lib.id, doc.id, store, parsed)
        return doc

    def schedule(self, library_id: str, document_id: str, store: LibraryStore,
                 parsed: Any = None) -> None:
        """Process a document on the worker thread; `parsed`: its `ParsedDocument` when the
        caller already has it (an upload is parsed once, to validate it)."""

        def work() -> None:
            try:
                store.process_document(library_id, document_id, parsed)
            except RAGError as exc:  # recorded on the document by the store
                log.info("document %s not processed: %s", document_id, exc)
            except Exception:
                log.exception("processing document %s failed", document_id)

        def forget(future: Future[None]) -> None:
            with self._queued_lock:
                if self._queued.get(document_id) is future:
                    del self._queued[document_id]

        with self._queued_lock:
            future = self._pool.submit(work)
            self._queued[document_id] = future
        future.add_done_callback(forget)

    def delete_document(self, library_id: str, document_id: str) -> Erasure:
        """Delete a document (blocking: call it on a worker thread): its queued ingestion is
        dropped, a running one stops at its next check; see `LibraryStore.delete_document`."""
        erasure = self.store.delete_document(library_id, document_id)
        self._erased(erasure)
        return erasure

    def delete_library(self, library_id: str) -> Erasure:
        """Delete a library and its documents, as `delete_document` does each of them."""
        erasure = self.store.delete_library(library_id)
        self._erased(erasure)
        return erasure

    def _erased(self, erasure: Erasure) -> None:
        with self._queued_lock:
            futures = [self._queued.pop(d, None) for d in erasure.document_ids]
        for future in futures:  # outside the lock: cancel() runs the done callbacks
            if future is not None:
                future.cancel()  # still queued: never runs (running: stops by itself)
        self._last_erasure = time.monotonic()
        self._purge_later()

    def _purge_later(self) -> None:
        """Purge the chunk table's files (`LibraryStore.purge`) once the versions holding
        the latest erasure are old enough to go; one timer at a time."""
        from souverain.rag.store import PURGE_KEEP

        delay = 2 * PURGE_KEEP.total_seconds()
        with self._queued_lock:
            if self._closed or self._purge_timer is not None:
                return
            self._purge_timer = threading.Timer(delay, self._purge)
            self._purge_timer.daemon = True
            self._purge_timer.start()

    def _purge(self) -> None:
        from souverain.rag.store import PURGE_KEEP

        fired = time.monotonic()
        with self._queued_lock:
            self._purge_timer = None
        try:
            if self._store is not None:
                self._store.purge()
        except Exception:
            log.exception("purging the chunk table failed; it is tried again after the next "
                          "deletion or start")
        if self._last_erasure > fired - PURGE_KEEP.total_seconds():
            self._purge_later()  # an erasure too recent for this purge: another one later

    def shutdown(self) -> None:
        """Stop: queued ingestions are dropped, a running one stops at its next check (its
        document stays 'todo' and is processed again at the next start)."""
        self._adopting.set()
        with self._queued_lock:
            self._closed = True
            if self._purge_timer is not None:
                self._purge_timer.cancel()
        if self._store is not None:
            self._store.interrupt()
        self._pool.shutdown(wait=False, cancel_futures=True)


def upload_mime(content_type: str | None) -> str | None:
    """A client's multipart content type, unless it says nothing (octet-stream): then the
    extension and the bytes decide."""
    if not content_type or content_type.split(";")[0].strip() == "application/octet-stream":
        return None
    return content_type.split(";")[0].strip()
