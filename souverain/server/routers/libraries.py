"""The Libraries API routes (``client.beta.libraries`` of the mistralai SDK), over the
`LibraryService` on ``app.state``; shaped as La Plateforme's OpenAPI spec and the mistralai 3.x
SDK models. Mounted only when libraries are on.

``GET/POST /v1/libraries``, ``GET/PATCH/PUT/DELETE /v1/libraries/{library_id}``,
``GET/POST /v1/libraries/{library_id}/documents`` (multipart upload),
``GET/PATCH/PUT/DELETE /v1/libraries/{library_id}/documents/{document_id}``,
``GET …/text_content``, ``GET …/status``, ``POST …/reprocess``; and souverain's
``POST /v1/libraries/{library_id}/search`` (the passages the ``document_library`` tool would
retrieve, with their scores).

Every store call runs on a worker thread (SQLite, LanceDB and parsing block); a `RAGError` it
raises becomes a 404 (no such library or document) or a 400. A DELETE puts what it erased
(library, document ids, chunk rows, stored bytes) in the request's audit record (``erased``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response

from souverain import audit
from souverain.errors import RAGError
from souverain.server import state
from souverain.server.access import authorize
from souverain.server.errors import APIError, call_in_thread
from souverain.server.keyfile import KeyInfo
from souverain.server.libraries import (
    LEGACY_STATUS,
    DocumentUpdate,
    LibraryCreate,
    LibrarySearch,
    LibraryService,
    LibraryUpdate,
    document_json,
    hit_json,
    library_json,
    rag_api_error,
    upload_mime,
)
from souverain.server.uploads import read_upload, upload_name

router = APIRouter()

_TAGS: list[str | Enum] = ["libraries"]
_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"description": d} for c, d in ((400, "Bad request"), (401, "No or bad API key"),
                                       (404, "No such library or document"),
                                       (409, "Another library has that name"),
                                       (413, "Upload too large"), (429, "Rate limited"))}

_call = partial(call_in_thread, errors=RAGError, translate=rag_api_error)
T = TypeVar("T")
# Far beyond any library (x page_size 1000 = 10^12 documents), and page * page_size stays
# within SQLite's 64-bit integers: a larger page is a 422 naming `page`, not an overflow.
MAX_PAGE = 1_000_000_000


async def _on_document(service: LibraryService, library_id: str, document_id: str,
                       fn: Callable[[Any, Any], T]) -> T:
    """``fn(library, document)`` on a worker thread, both looked up first (404 if missing)."""
    def work() -> T:
        store = service.store
        lib = store.get_library(library_id)
        return fn(lib, store.get_document(lib.id, document_id))
    return await _call(work)


@router.get("/v1/libraries", tags=_TAGS, summary="List libraries", responses=_ERRORS)
async def list_libraries(request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)
    libs = await _call(lambda: service.store.list_libraries())
    return {"data": [library_json(lib) for lib in libs]}


@router.post("/v1/libraries", status_code=201, tags=_TAGS, summary="Create a library",
             responses=_ERRORS)
async def create_library(body: LibraryCreate, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)
    lib = await _call(lambda: service.store.create_library(body.name, body.description))
    return library_json(lib)


@router.get("/v1/libraries/{library_id}", tags=_TAGS, summary="One library",
            responses=_ERRORS)
async def get_library(library_id: str, request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)
    return library_json(await _call(lambda: service.store.get_library(library_id)))


async def _update_library(service: LibraryService, library_id: str,
                          body: LibraryUpdate) -> dict[str, Any]:
    def work() -> Any:
        store = service.store
        lib = store.get_library(library_id)
        return store.update_library(lib.id, name=body.name, description=body.description)
    return library_json(await _call(work))


@router.patch("/v1/libraries/{library_id}", tags=_TAGS,
              summary="Rename or describe a library", responses=_ERRORS)
async def patch_library(library_id: str, body: LibraryUpdate, request: Request,
                        key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _update_library(state.libraries(request), library_id, body)


@router.put("/v1/libraries/{library_id}", tags=_TAGS, summary="Rename or describe a library",
            responses=_ERRORS)
async def put_library(library_id: str, body: LibraryUpdate, request: Request,
                      key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _update_library(state.libraries(request), library_id, body)


@router.delete("/v1/libraries/{library_id}", status_code=204, tags=_TAGS,
               summary="Delete a library with all its documents", responses=_ERRORS)
async def delete_library(library_id: str, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> Response:
    service = state.libraries(request)
    erasure = await _call(service.delete_library, library_id)
    audit.note(request)["erased"] = erasure.audit()
    return Response(status_code=204)


# -- documents ----------------------------------------------------------------------------
@router.get("/v1/libraries/{library_id}/documents", tags=_TAGS, summary="List documents",
            responses=_ERRORS)
async def list_documents(library_id: str, request: Request, search: str | None = None,
                         page_size: int = Query(100, ge=1, le=1000),
                         page: int = Query(0, ge=0, le=MAX_PAGE),
                         sort_by: Literal["created_at", "name", "size"] = "created_at",
                         sort_order: Literal["asc", "desc"] = "desc",
                         filters_attributes: str | None = None,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)

    def work() -> tuple[list[Any], int]:
        store = service.store
        lib = store.get_library(library_id)
        return store.list_documents(lib.id, search=search, offset=page * page_size,
                                    limit=page_size, sort_by=sort_by,
                                    descending=sort_order == "desc")
    docs, total = await _call(work)
    pages = math.ceil(total / page_size) if total else 0
    return {"pagination": {"total_items": total, "total_pages": pages,
                           "current_page": page, "page_size": page_size,
                           "has_more": (page + 1) * page_size < total},
            "data": [document_json(d) for d in docs]}


@router.post("/v1/libraries/{library_id}/documents", tags=_TAGS,
             summary="Upload a document (txt, md, html, pdf, docx); processed in the "
                     "background", responses=_ERRORS)
async def upload_document(library_id: str, request: Request,
                          file: UploadFile = File(...),
                          key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    name = upload_name(file, "NAME")
    data = await read_upload(file, name, state.config(request).max_upload_bytes,
                             what="upload", flag="--max-upload-mib")
    service = state.libraries(request)
    doc = await _call(service.add_upload, library_id, data, name, upload_mime(file.content_type))
    return document_json(doc)


@router.post("/v1/libraries/{library_id}/search", tags=_TAGS,
             summary="souverain: search a library's passages (hybrid, vector or text)",
             responses=_ERRORS)
async def search_library(library_id: str, body: LibrarySearch, request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)

    def work() -> list[Any]:
        lib = service.store.get_library(library_id)  # 404 before any embedding work
        return service.store.search([lib.id], body.query, body.top_k, mode=body.mode,
                                    document_ids=body.document_ids, tags=body.tags)
    hits = await _call(work)
    return {"object": "list", "library_id": library_id, "query": body.query,
            "mode": body.mode, "data": [hit_json(h) for h in hits]}


@router.get("/v1/libraries/{library_id}/documents/{document_id}", tags=_TAGS,
            summary="One document's metadata and status", responses=_ERRORS)
async def get_document(library_id: str, document_id: str, request: Request,
                       key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)
    return document_json(await _on_document(service, library_id, document_id,
                                            lambda lib, doc: doc))


async def _update_document(service: LibraryService, library_id: str, document_id: str,
                           body: DocumentUpdate) -> dict[str, Any]:
    tags = None
    if body.attributes is not None and "tags" in body.attributes:
        tags = body.attributes["tags"]
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise APIError(400, "attributes.tags must be a list of strings.",
                           param="attributes")
    return document_json(await _on_document(
        service, library_id, document_id,
        lambda lib, doc: service.store.update_document(lib.id, doc.id, name=body.name,
                                                       tags=tags)))


@router.patch("/v1/libraries/{library_id}/documents/{document_id}", tags=_TAGS,
              summary="Rename a document or set its tags", responses=_ERRORS)
async def patch_document(library_id: str, document_id: str, body: DocumentUpdate,
                         request: Request,
                         key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _update_document(state.libraries(request), library_id, document_id, body)


@router.put("/v1/libraries/{library_id}/documents/{document_id}", tags=_TAGS,
            summary="Rename a document or set its tags", responses=_ERRORS)
async def put_document(library_id: str, document_id: str, body: DocumentUpdate,
                       request: Request,
                       key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    return await _update_document(state.libraries(request), library_id, document_id, body)


@router.delete("/v1/libraries/{library_id}/documents/{document_id}", status_code=204,
               tags=_TAGS, summary="Delete a document and its passages", responses=_ERRORS)
async def delete_document(library_id: str, document_id: str, request: Request,
                          key: KeyInfo | None = Depends(authorize)) -> Response:
    service = state.libraries(request)
    erasure = await _on_document(service, library_id, document_id,
                                 lambda lib, doc: service.delete_document(lib.id, doc.id))
    audit.note(request)["erased"] = erasure.audit()
    return Response(status_code=204)


@router.get("/v1/libraries/{library_id}/documents/{document_id}/text_content", tags=_TAGS,
            summary="The text extracted from a document", responses=_ERRORS)
async def text_content(library_id: str, document_id: str, request: Request,
                       key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)

    def text(lib: Any, doc: Any) -> str:
        if doc.status != "done":
            raise RAGError(f"Document {doc.name} is not processed yet (status "
                           f"{doc.status}); poll its status until it is 'done'.")
        return service.store.document_text(lib.id, doc.id)
    return {"text": await _on_document(service, library_id, document_id, text)}


@router.get("/v1/libraries/{library_id}/documents/{document_id}/status", tags=_TAGS,
            summary="A document's processing status", responses=_ERRORS)
async def document_status(library_id: str, document_id: str, request: Request,
                          key: KeyInfo | None = Depends(authorize)) -> dict[str, Any]:
    service = state.libraries(request)
    doc = await _on_document(service, library_id, document_id, lambda lib, doc: doc)
    return {"document_id": doc.id, "process_status": doc.status,
            "processing_status": LEGACY_STATUS.get(doc.status, doc.status),
            **({"error": doc.error} if doc.error else {})}


@router.post("/v1/libraries/{library_id}/documents/{document_id}/reprocess",
             status_code=204, tags=_TAGS, summary="Process a document again", responses=_ERRORS)
async def reprocess(library_id: str, document_id: str, request: Request,
                    key: KeyInfo | None = Depends(authorize)) -> Response:
    service = state.libraries(request)

    def again(lib: Any, doc: Any) -> None:
        service.store.reset_document(lib.id, doc.id)
        service.schedule(lib.id, doc.id, service.store)
    await _on_document(service, library_id, document_id, again)
    return Response(status_code=204)
