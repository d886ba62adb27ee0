"""`LifecycleService`: what the server does with the models' lifecycle rows
(`souverain.finetune.lifecycle`).

Every request that names a model passes `route` (through `access.check_model`, the one
resolution point of chat, FIM, completions, embeddings, moderation, classifications and batch
lines): a withdrawn model gets 410 ``model_withdrawn`` naming its replacement, or, with fallback
(``--withdrawn-fallback``, or the model's own setting), is served by the replacement with
``x-souverain-model-replaced: OLD -> NEW``; a deprecated model answers with RFC 9745's
``Deprecation: @<epoch>`` and RFC 8594's ``Sunset: <HTTP-date>`` (its deprecation date) and a
``Link: <replacement>; rel="successor-version"``. A deleted fine-tuned model is a 404.

Rows are read at most once a second per server (`all`, cached), so a change made by another
server on the same database (or by ``souverain models``) applies within a second.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from collections.abc import Callable
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from fastapi import Request

from souverain.finetune.lifecycle import Lifecycle, LifecycleStore
from souverain.server.auth import is_loopback
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo

log = logging.getLogger("souverain.server")
HEADERS_KEY = "souverain.headers"  # scope["state"][...]: headers added to the response


def response_headers(request: Request) -> dict[str, str]:
    """The headers `LifecycleHeaders` adds to this request's response."""
    return request.scope.setdefault("state", {}).setdefault(HEADERS_KEY, {})


class LifecycleHeaders:
    """ASGI middleware: the lifecycle headers a handler set, on its response (JSON or SSE)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(HEADERS_KEY)
                if extra:
                    message["headers"] = [*message.get("headers", []),
                                          *((k.encode(), v.encode()) for k, v in extra.items())]
            await send(message)

        await self.app(scope, receive, with_headers)


def _date_time(day: str) -> dt.datetime:
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.timezone.utc)


class LifecycleService:
    """The lifecycle rows as the server applies them (see the module docstring)."""

    def __init__(self, store: LifecycleStore, fallback: bool = False):
        self.store = store
        self.fallback = fallback
        self._cache: tuple[float, dict[str, Lifecycle]] = (0.0, {})
        self._lock = threading.Lock()

    def rows(self) -> dict[str, Lifecycle]:
        """Every row, cached 1 s (`invalidate` after a change made here)."""
        with self._lock:
            at, rows = self._cache
            if time.monotonic() - at >= 1.0:
                rows = self.store.all()
                self._cache = (time.monotonic(), rows)
            return rows

    def invalidate(self) -> None:
        with self._lock:
            self._cache = (0.0, {})

    def get(self, model_id: str) -> Lifecycle:
        return self.rows().get(model_id) or Lifecycle(model_id)

    def deleted(self, model_id: str) -> bool:
        return self.get(model_id).deleted_at is not None

    def route(self, request: Request, model: str) -> str:
        """The model that serves a request for ``model``: itself (deprecated: with headers),
        its replacement (withdrawn with fallback), or a 410 / 404."""
        row = self.get(model)
        state = row.state
        if state == "active":
            return model
        if state == "deleted":
            raise APIError(404, f"Model {model!r} was deleted; GET /v1/models lists the models "
                                "served here.", param="model", code="model_not_found")
        if state == "withdrawn":
            use_fallback = row.fallback if row.fallback is not None else self.fallback
            if use_fallback and row.replacement:
                response_headers(request)["x-souverain-model-replaced"] = \
                    f"{model} -> {row.replacement}"
                return row.replacement
            instead = (f"use {row.replacement} instead" if row.replacement
                       else "ask the server's operator which model replaces it")
            raise APIError(410, f"Model {model!r} was withdrawn from service; {instead}.",
                           param="model", code="model_withdrawn")
        headers = response_headers(request)
        headers["Deprecation"] = f"@{int(row.deprecated_at or row.modified_at)}"
        if row.deprecation:
            headers["Sunset"] = format_datetime(_date_time(row.deprecation), usegmt=True)
        if row.replacement:
            headers["Link"] = f'</v1/models/{row.replacement}>; rel="successor-version"'
        return model

    def card_fields(self, model_id: str, fine_tuned: bool) -> dict[str, Any]:
        """The card fields of La Plateforme's ``BaseModelCard`` / ``FTModelCard``."""
        row = self.get(model_id)
        fields: dict[str, Any] = {
            "deprecation": _date_time(row.deprecation).isoformat().replace("+00:00", "Z")
            if row.deprecation else None,
            "deprecation_replacement_model": row.replacement,
        }
        if fine_tuned:
            fields["archived"] = row.archived
            if row.name is not None:
                fields["name"] = row.name
            if row.description is not None:
                fields["description"] = row.description
        return fields

    def finish_deletions(self, succeeded: Callable[[], list[tuple[str, str, str, str]]]) -> int:
        """At start: erase the adapter folders of deleted fine-tuned models that a crash left
        behind (the row is written first, the files after); returns how many."""
        rows = self.rows()
        done = 0
        for name, _base, adapter_dir, _job in succeeded():
            row = rows.get(name)
            if row is not None and row.deleted_at is not None and Path(adapter_dir).exists():
                files, size = erase_adapter(Path(adapter_dir))
                log.info("finished deleting %s: %d files, %d bytes erased", name, files, size)
                done += 1
        return done

    def change(self, request: Request, key: KeyInfo | None, model_id: str,
               **values: Any) -> tuple[Lifecycle, Lifecycle]:
        old, new = self.store.change(model_id, key.key_id if key else None, **values)
        self.invalidate()
        return old, new


def erase_adapter(folder: Path) -> tuple[int, int]:
    """Delete a fine-tuned model's adapter folder; (files, bytes) deleted. The job's run
    folder (checkpoints, optimizer states) goes with it when the adapter lies in
    ``runs/<job>/``."""
    run = next((p for p in folder.parents if p.parent.name == "runs"), None)
    target = run if run is not None else folder
    if not target.exists():
        return 0, 0
    found = [p for p in target.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in found)
    shutil.rmtree(target)
    return len(found), size


def require_admin(request: Request, key: KeyInfo | None) -> None:
    """Lifecycle changes are administration: a key with ``scopes=admin`` in the keys file
    (with keys), or a client on this machine (without keys)."""
    if key is not None and "admin" not in key.scopes:
        raise APIError(403, "Changing a model's lifecycle needs an administrator's key: one "
                            "with scopes=admin in the keys file (souverain keys add FILE NAME "
                            "--admin).", code="admin_required")
    if key is None and not is_loopback(request.client.host if request.client else None):
        raise APIError(403, "Without API keys, only clients on this machine may change a "
                            "model's lifecycle; start the server with --api-keys-file.",
                       code="admin_required")
