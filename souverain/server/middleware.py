"""The server's ASGI middleware: the request body size limit (413 before the body is read)
and the request metrics (by route template, method and status, with the duration)."""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from souverain.audit import route_paths
from souverain.server.errors import error_body
from souverain.server.metrics import ServerMetrics


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) before they are read into memory."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None,
                 file_limit: int | None = None):
        self.app, self.default, self.upload_limit = app, limit, upload_limit or limit
        self.file_limit = file_limit or self.upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _is_file_upload(scope):  # POST /v1/files: its own limit, with multipart slack
            limit, flag = self.file_limit + 64 * 1024, "--max-file-mib"
        elif _is_upload(scope):
            limit, flag = self.upload_limit, "--max-upload-mib"
        else:
            limit, flag = self.default, "--max-request-mib"
        await self._limited(scope, receive, send, limit, flag)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int,
                       flag: str) -> None:
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
        if too_big:
            return await self._reject(send, limit, flag)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, self._message(limit, flag))
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send, limit, flag)

    def _message(self, limit: int, flag: str) -> str:
        return (f"The request body is over the server's limit of {limit} bytes; send "
                f"less (or raise {flag}).")

    async def _reject(self, send: Send, limit: int, flag: str) -> None:
        body = json.dumps(error_body(413, self._message(limit, flag))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _is_upload(scope: Scope) -> bool:
    """A document upload: POST /v1/libraries/{id}/documents (multipart)."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and path.startswith("/v1/libraries/") \
        and path.rstrip("/").endswith("/documents")


def _is_file_upload(scope: Scope) -> bool:
    """A file upload for fine-tuning or batch: POST /v1/files (multipart)."""
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/files"


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI lets it through (it turns other errors raised while
    reading the body into a 400) to the handler that answers 413 in the error shape."""


class RequestMetrics:
    """ASGI middleware: requests by route template, method and status; duration."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template is None:  # plain Starlette routes (/openapi.json, /docs), or a
                # request refused before routing (413): a fixed path is its own template
                path = scope.get("path", "")
                routes = getattr(scope.get("app"), "routes", ())
                template = path if path in route_paths(routes) else "unmatched"
            self.metrics.observe_request(template, scope.get("method", "GET"), status,
                                         time.perf_counter() - start)

