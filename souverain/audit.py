"""The audit log: one JSON line per API call, written off the event loop.

Each line: ``ts`` (UTC, ISO 8601), ``request_id``, ``key_id`` and ``key_name`` (from the API
keys file; never the key nor its hash), ``client_ip``, ``method``, ``route`` (the template,
``/v1/models/{model_id}``), ``model``, ``status``, ``latency_ms``, ``prompt_tokens``,
``completion_tokens``. With ``content=True`` also ``request`` (the JSON body) and ``response``
(the generated text, or the error message), both with personal data redacted
(`souverain.redact`). Headers are never logged.

Handlers pass what only they know (key, model, token counts, the completion id) through
``note(request)``, a dict in the request's ASGI ``state`` that `AuditMiddleware` reads when
the response is over (after the last SSE chunk for a stream). ``GET /health`` (liveness
probes, no data) is not logged.

Lines go to ``audit-YYYY-MM-DD.jsonl`` (UTC day) in a directory, or to one fixed file; files
are created 0600 and opened append-only. A background thread does the JSON encoding, the
redaction and the writes; `AuditLog.close` drains its queue (the server calls it at shutdown).
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from souverain.redact import redact, redact_json

log = logging.getLogger("souverain.audit")

NOTE_KEY = "souverain.audit"
_BODY_PEEK = 64 * 1024  # enough to find the model of a request the handler never saw
_CONTENT_CAP = 1 << 20  # most bytes of a body or response kept for --audit-content
UNLOGGED = frozenset({"/health"})  # liveness probes: no data, and one a second would drown it
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


def note(request: Any) -> dict[str, Any]:
    """The audit notes of a request (a Starlette `Request`): handlers set ``key_id``,
    ``key_name``, ``model``, ``request_id``, ``prompt_tokens``, ``completion_tokens``."""
    state = request.scope.setdefault("state", {})
    return state.setdefault(NOTE_KEY, {})


class AuditLog:
    """Appends records to a JSONL file from a writer thread.

    ``path``: one fixed file; otherwise ``directory/audit-YYYY-MM-DD.jsonl``."""

    def __init__(self, directory: Path | str | None = None, *, path: Path | str | None = None,
                 content: bool = False):
        if (directory is None) == (path is None):
            raise ValueError("give exactly one of directory or path")
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.path = Path(path).expanduser() if path is not None else None
        self.content = content
        target = self.path.parent if self.path is not None else self.directory
        assert target is not None
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._open_path: Path | None = None
        self._fd: int | None = None
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="souverain-audit", daemon=True)
        self._closed = False
        self._thread.start()
        self._open(self._file_for(time.time()))  # a bad path fails now, not at the first call
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"AuditLog({self.path or self.directory}, content={self.content})"

    def describe(self) -> str:
        where = self.path if self.path is not None \
            else self.directory / "audit-YYYY-MM-DD.jsonl"  # type: ignore[operator]
        return f"{where}{' with redacted content' if self.content else ''}"

    # -- producer side (event loop) ------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> None:
        """Queue one finished call (raw bytes included); never blocks."""
        if not self._closed:
            self._queue.put(event)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- writer thread -------------------------------------------------------------------
    def _file_for(self, ts: float) -> Path:
        if self.path is not None:
            return self.path
        day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")
        return self.directory / f"audit-{day}.jsonl"  # type: ignore[operator]

    def _open(self, path: Path) -> None:
        if self._open_path == path and self._fd is not None:
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._open_path = path

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                record = self.record(event)
                self._open(self._file_for(event["start"]))
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
                os.write(self._fd, line.encode())  # type: ignore[arg-type]
            except Exception:  # the server must go on; the log says why
                log.exception("could not write an audit record")

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """The JSON line of one finished call (runs on the writer thread)."""
        n = event["note"]
        body: bytes = event.get("body", b"")
        model = n.get("model")
        if model is None and body:
            m = _MODEL_RE.search(body)
            if m:
                model = json.loads(b'"' + m.group(1) + b'"')
        rec: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(event["start"], dt.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": n.get("request_id") or event["request_id"],
            "key_id": n.get("key_id"),
            "key_name": n.get("key_name"),
            "client_ip": event.get("client_ip"),
            "method": event["method"],
            "route": event["route"],
            "model": model,
            "status": event["status"],
            "latency_ms": round(event["latency_s"] * 1000, 1),
            "prompt_tokens": n.get("prompt_tokens"),
            "completion_tokens": n.get("completion_tokens"),
        }
        if self.content:
            rec["request"] = _redacted_body(body) if body else None
            rec["response"] = _response_text(event.get("response", b""),
                                             event.get("content_type", ""))
        return rec


def _redacted_body(body: bytes) -> Any:
    try:
        return redact_json(json.loads(body))
    except ValueError:
        return redact(body.decode("utf-8", errors="replace"))


def _texts_of(obj: Any, parts: list[str]) -> None:
    """The human-readable text of a response object: choices' content and tool-call arguments
    (message or streamed delta), or an error's message."""
    if not isinstance(obj, dict):
        return
    if obj.get("object") == "error" and isinstance(obj.get("message"), str):
        parts.append(obj["message"])
        return
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message") or choice.get("delta") or {}
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict))
        for call in msg.get("tool_calls") or ():
            fn = (call or {}).get("function") or {}
            parts.append(f"{fn.get('name', '')}({fn.get('arguments', '')})")


def _response_text(body: bytes, content_type: str) -> str | None:
    parts: list[str] = []
    if content_type.startswith("text/event-stream"):
        for line in body.decode("utf-8", errors="replace").splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                try:
                    _texts_of(json.loads(line[6:]), parts)
                except ValueError:
                    continue
    elif content_type.startswith("application/json"):
        try:
            _texts_of(json.loads(body), parts)
        except ValueError:
            return None
    return redact("".join(parts)) if parts else None


class AuditMiddleware:
    """ASGI middleware: hands every finished HTTP call to an `AuditLog`.

    It adds an ``x-request-id`` header (the id in the log) to each response."""

    def __init__(self, app: Any, audit: AuditLog):
        self.app, self.audit = app, audit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLOGGED:
            return await self.app(scope, receive, send)
        start_wall, start = time.time(), time.perf_counter()
        request_id = f"req-{uuid.uuid4().hex}"
        notes = scope.setdefault("state", {}).setdefault(NOTE_KEY, {})
        cap = _CONTENT_CAP if self.audit.content else _BODY_PEEK
        body: list[bytes] = []
        kept = 0
        response: list[bytes] = []
        status, content_type = 500, ""

        async def tap_receive() -> dict:
            nonlocal kept
            message = await receive()
            if message["type"] == "http.request" and kept < cap:
                chunk = message.get("body", b"")[: cap - kept]
                body.append(chunk)
                kept += len(chunk)
            return message

        async def tap_send(message: dict) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                for k, v in headers:
                    if k.lower() == b"content-type":
                        content_type = v.decode("latin-1")
                rid = notes.get("request_id") or request_id
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif (message["type"] == "http.response.body" and self.audit.content
                  and sum(len(r) for r in response) < _CONTENT_CAP):
                response.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, tap_receive, tap_send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # plain Starlette routes (/openapi.json, /docs): fixed paths
                path = scope.get("path", "")
                routes = getattr(scope.get("app"), "routes", ())
                route = path if path in route_paths(routes) else "unmatched"
            client = scope.get("client")
            self.audit.submit({
                "start": start_wall, "latency_s": time.perf_counter() - start,
                "request_id": request_id, "note": dict(notes),
                "client_ip": client[0] if client else None,
                "method": scope.get("method", "GET"), "route": route, "status": status,
                "body": b"".join(body), "response": b"".join(response),
                "content_type": content_type,
            })


def route_paths(routes: Sequence[Any]) -> set[str | None]:
    """The path template of every route of an app. FastAPI >= 0.137 keeps an included router
    as one node of ``app.routes``, which `iter_route_contexts` expands; before, ``app.routes``
    held every route itself."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return {getattr(r, "path", None) for r in routes}
    return {c.path for c in iter_route_contexts(routes)}
