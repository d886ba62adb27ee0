"""The server's document libraries over `LibraryStore`: the service (store opened on first
use, one ingest worker thread), the request bodies and the JSON shapes of Mistral's Libraries
API (``client.beta.libraries`` in the official SDK); its routes are
`souverain.server.routers.libraries`.

An upload is stored at once and answered with ``process_status: "todo"``; one background
worker thread parses, chunks and embeds it (``in_progress`` -> ``done`` or ``error`` with the
reason). Documents left unprocessed by a stopped server are queued again at start. Signed URLs
do not apply to a server on your own machine and are not offered.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from souverain.errors import RAGError
from souverain.server.errors import APIError

if TYPE_CHECKING:
    from souverain.rag.store import LibraryStore

log = logging.getLogger("souverain.server.libraries")

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
    from souverain.rag.store import DocumentNotFound, LibraryNotFound

    if isinstance(exc, (LibraryNotFound, DocumentNotFound)):
        return APIError(404, str(exc), code="not_found")
    return APIError(400, str(exc), code="invalid_document")


class LibraryService:
    """The server's document libraries: a `LibraryStore` opened on first use, and one worker
    thread that processes uploads in order (parsing and embedding are CPU-bound; one at a time
    leaves the other cores to generation)."""

    def __init__(self, root: Path | None = None, embed_model: str | None = None):
        self.root = root
        self.embed_model = embed_model
        self._store: LibraryStore | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="souverain-ingest")

    @property
    def store(self) -> LibraryStore:
        with self._lock:
            if self._store is None:
                from souverain.rag.store import LibraryStore

                # the embedder loads on the first upload or search, not to list libraries
                self._store = LibraryStore(self.root, self.embed_model)
                self._requeue(self._store)
            return self._store

    def _requeue(self, store: LibraryStore) -> None:
        """Documents a stopped server left 'todo' or 'in_progress' are processed again."""
        for lib in store.list_libraries():
            offset = 0
            while True:
                docs, total = store.list_documents(lib.id, offset=offset, limit=500)
                for d in docs:
                    if d.status in ("todo", "in_progress"):
                        self.schedule(lib.id, d.id, store)
                offset += len(docs)
                if not docs or offset >= total:
                    break

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

        self._pool.submit(work)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def upload_mime(content_type: str | None) -> str | None:
    """A client's multipart content type, unless it says nothing (octet-stream): then the
    extension and the bytes decide."""
    if not content_type or content_type.split(";")[0].strip() == "application/octet-stream":
        return None
    return content_type.split(";")[0].strip()
