"""Mistral's Libraries API (``client.beta.libraries`` in the official SDK) over `LibraryStore`.

Routes, shaped as La Plateforme's OpenAPI spec and the mistralai 3.x SDK models:
``GET/POST /v1/libraries``, ``GET/PATCH/PUT/DELETE /v1/libraries/{library_id}``,
``GET/POST /v1/libraries/{library_id}/documents`` (multipart upload),
``GET/PATCH/PUT/DELETE /v1/libraries/{library_id}/documents/{document_id}``,
``GET …/text_content``, ``GET …/status``, ``POST …/reprocess``.

An upload is stored at once and answered with ``process_status: "todo"``; one background
worker thread parses, chunks and embeds it (``in_progress`` -> ``done`` or ``error`` with the
reason). Documents left unprocessed by a stopped server are queued again at start. Signed URLs
do not apply to a server on your own machine and are not offered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from souverain.errors import RAGError
from souverain.server.errors import APIError

log = logging.getLogger("souverain.server.libraries")

# mistralai's legacy `processing_status` strings next to the current `process_status`
_LEGACY_STATUS = {"todo": "Pending", "in_progress": "Running", "done": "Completed",
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
            "process_status": status, "processing_status": _LEGACY_STATUS.get(status, status),
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
        self._store: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="souverain-ingest")

    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from souverain.rag.store import LibraryStore

                # the embedder loads on the first upload or search, not to list libraries
                self._store = LibraryStore(self.root, self.embed_model)
                self._requeue(self._store)
            return self._store

    def _requeue(self, store: Any) -> None:
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

    def schedule(self, library_id: str, document_id: str, store: Any = None,
                 parsed: Any = None) -> None:
        """Process a document on the worker thread; `parsed`: its `ParsedDocument` when the
        caller already has it (an upload is parsed once, to validate it)."""
        store = store or self._store

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


def _mime(content_type: str | None) -> str | None:
    """A client's multipart content type, unless it says nothing (octet-stream): then the
    extension and the bytes decide."""
    if not content_type or content_type.split(";")[0].strip() == "application/octet-stream":
        return None
    return content_type.split(";")[0].strip()


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except RAGError as exc:
        raise rag_api_error(exc) from None


def install(app: FastAPI, authorize: Callable[..., Any], service: LibraryService, *,
            max_upload_bytes: int) -> None:
    """Add the Libraries routes to `app`."""
    auth = Depends(authorize)
    tags = ["libraries"]
    errs = {c: {"description": d} for c, d in ((400, "Bad request"), (401, "No or bad API key"),
                                                (404, "No such library or document"),
                                                (413, "Upload too large"),
                                                (429, "Rate limited"))}

    def store() -> Any:
        return service.store

    @app.get("/v1/libraries", tags=tags, summary="List libraries", responses=errs)
    async def list_libraries(key: Any = auth) -> dict[str, Any]:
        libs = await _call(lambda: store().list_libraries())
        return {"data": [library_json(lib) for lib in libs]}

    @app.post("/v1/libraries", status_code=201, tags=tags, summary="Create a library",
              responses=errs)
    async def create_library(body: LibraryCreate, key: Any = auth) -> dict[str, Any]:
        lib = await _call(lambda: store().create_library(body.name, body.description))
        return library_json(lib)

    @app.get("/v1/libraries/{library_id}", tags=tags, summary="One library", responses=errs)
    async def get_library(library_id: str, key: Any = auth) -> dict[str, Any]:
        return library_json(await _call(lambda: store().get_library(library_id)))

    async def update(library_id: str, body: LibraryUpdate) -> dict[str, Any]:
        def work() -> Any:
            lib = store().get_library(library_id)
            return store().update_library(lib.id, name=body.name, description=body.description)
        return library_json(await _call(work))

    @app.patch("/v1/libraries/{library_id}", tags=tags, summary="Rename or describe a library",
               responses=errs)
    async def patch_library(library_id: str, body: LibraryUpdate,
                            key: Any = auth) -> dict[str, Any]:
        return await update(library_id, body)

    @app.put("/v1/libraries/{library_id}", tags=tags, summary="Rename or describe a library",
             responses=errs)
    async def put_library(library_id: str, body: LibraryUpdate,
                          key: Any = auth) -> dict[str, Any]:
        return await update(library_id, body)

    @app.delete("/v1/libraries/{library_id}", status_code=204, tags=tags,
                summary="Delete a library with all its documents", responses=errs)
    async def delete_library(library_id: str, key: Any = auth) -> Response:
        def work() -> None:
            lib = store().get_library(library_id)
            store().delete_library(lib.id)
        await _call(work)
        return Response(status_code=204)

    # -- documents ----------------------------------------------------------------------------
    @app.get("/v1/libraries/{library_id}/documents", tags=tags, summary="List documents",
             responses=errs)
    async def list_documents(library_id: str, search: str | None = None,
                             page_size: int = Query(100, ge=1, le=1000),
                             page: int = Query(0, ge=0),
                             sort_by: Literal["created_at", "name", "size"] = "created_at",
                             sort_order: Literal["asc", "desc"] = "desc",
                             filters_attributes: str | None = None,
                             key: Any = auth) -> dict[str, Any]:
        def work() -> tuple[list[Any], int]:
            lib = store().get_library(library_id)
            return store().list_documents(lib.id, search=search, offset=page * page_size,
                                          limit=page_size, sort_by=sort_by,
                                          descending=sort_order == "desc")
        docs, total = await _call(work)
        pages = math.ceil(total / page_size) if total else 0
        return {"pagination": {"total_items": total, "total_pages": pages,
                               "current_page": page, "page_size": page_size,
                               "has_more": (page + 1) * page_size < total},
                "data": [document_json(d) for d in docs]}

    @app.post("/v1/libraries/{library_id}/documents", tags=tags,
              summary="Upload a document (txt, md, html, pdf, docx); processed in the "
                      "background", responses=errs)
    async def upload_document(library_id: str, request: Request,
                              file: UploadFile = File(...),
                              key: Any = auth) -> dict[str, Any]:
        name = Path(file.filename or "").name
        if not name:
            raise APIError(400, "The uploaded file has no name; send it as "
                                "file=@path;filename=NAME.", param="file")
        data = await file.read()
        if len(data) > max_upload_bytes:
            raise APIError(413, f"{name} is {len(data)} bytes, over the upload limit of "
                                f"{max_upload_bytes} bytes; split it or raise "
                                "--max-upload-mib.", code="too_large")

        def work() -> Any:
            from souverain.rag.parse import parse_document

            s = store()
            lib = s.get_library(library_id)
            # unsupported, corrupt or empty: a 400 now, and nothing stored
            parsed = parse_document(data, name, _mime(file.content_type))
            doc = s.register_document(lib.id, data, name, mime_type=_mime(file.content_type))
            if doc.status in ("todo", "in_progress"):
                service.schedule(lib.id, doc.id, s, parsed)
            return doc
        return document_json(await _call(work))

    def _doc(library_id: str, document_id: str) -> tuple[Any, Any]:
        lib = store().get_library(library_id)
        return lib, store().get_document(lib.id, document_id)

    @app.get("/v1/libraries/{library_id}/documents/{document_id}", tags=tags,
             summary="One document's metadata and status", responses=errs)
    async def get_document(library_id: str, document_id: str,
                           key: Any = auth) -> dict[str, Any]:
        return document_json((await _call(_doc, library_id, document_id))[1])

    async def update_document(library_id: str, document_id: str,
                              body: DocumentUpdate) -> dict[str, Any]:
        tags_ = None
        if body.attributes is not None and "tags" in body.attributes:
            tags_ = body.attributes["tags"]
            if not (isinstance(tags_, list) and all(isinstance(t, str) for t in tags_)):
                raise APIError(400, "attributes.tags must be a list of strings.",
                               param="attributes")

        def work() -> Any:
            lib, doc = _doc(library_id, document_id)
            return store().update_document(lib.id, doc.id, name=body.name, tags=tags_)
        return document_json(await _call(work))

    @app.patch("/v1/libraries/{library_id}/documents/{document_id}", tags=tags,
               summary="Rename a document or set its tags", responses=errs)
    async def patch_document(library_id: str, document_id: str, body: DocumentUpdate,
                             key: Any = auth) -> dict[str, Any]:
        return await update_document(library_id, document_id, body)

    @app.put("/v1/libraries/{library_id}/documents/{document_id}", tags=tags,
             summary="Rename a document or set its tags", responses=errs)
    async def put_document(library_id: str, document_id: str, body: DocumentUpdate,
                           key: Any = auth) -> dict[str, Any]:
        return await update_document(library_id, document_id, body)

    @app.delete("/v1/libraries/{library_id}/documents/{document_id}", status_code=204,
                tags=tags, summary="Delete a document and its passages", responses=errs)
    async def delete_document(library_id: str, document_id: str, key: Any = auth) -> Response:
        def work() -> None:
            lib, doc = _doc(library_id, document_id)
            store().delete_document(lib.id, doc.id)
        await _call(work)
        return Response(status_code=204)

    @app.get("/v1/libraries/{library_id}/documents/{document_id}/text_content", tags=tags,
             summary="The text extracted from a document", responses=errs)
    async def text_content(library_id: str, document_id: str,
                           key: Any = auth) -> dict[str, Any]:
        def work() -> str:
            lib, doc = _doc(library_id, document_id)
            if doc.status != "done":
                raise RAGError(f"Document {doc.name} is not processed yet (status "
                               f"{doc.status}); poll its status until it is 'done'.")
            return store().document_text(lib.id, doc.id)
        return {"text": await _call(work)}

    @app.get("/v1/libraries/{library_id}/documents/{document_id}/status", tags=tags,
             summary="A document's processing status", responses=errs)
    async def document_status(library_id: str, document_id: str,
                              key: Any = auth) -> dict[str, Any]:
        doc = (await _call(_doc, library_id, document_id))[1]
        return {"document_id": doc.id, "process_status": doc.status,
                "processing_status": _LEGACY_STATUS.get(doc.status, doc.status),
                **({"error": doc.error} if doc.error else {})}

    @app.post("/v1/libraries/{library_id}/documents/{document_id}/reprocess",
              status_code=204, tags=tags, summary="Process a document again", responses=errs)
    async def reprocess(library_id: str, document_id: str, key: Any = auth) -> Response:
        def work() -> None:
            lib, doc = _doc(library_id, document_id)
            store().reset_document(lib.id, doc.id)
            service.schedule(lib.id, doc.id, store())
        await _call(work)
        return Response(status_code=204)

