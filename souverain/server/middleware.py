"""The server's ASGI middleware: the request body size limit (413 before the body is read),
the JSON body check (422 naming what is wrong, before FastAPI parses it), the refusal of API
keys in URLs, and the request metrics (by route template, method and status, with the
duration)."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from souverain.audit import route_paths
from souverain.server.access import secret_query_params
from souverain.server.errors import error_body
from souverain.server.metrics import ServerMetrics

MAX_JSON_DEPTH = 100
"""Most levels of arrays and objects in a JSON body (a chat with tools and a JSON schema needs
about 20); deeper bodies would reach the recursion limits of the parsers behind it."""
_MAX_INT_DIGITS = 4300  # Python's own bound on int() of a string (sys.get_int_max_str_digits)


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


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


# -- the JSON body check ----------------------------------------------------------------------
class _NonFinite:
    """What the parser makes of ``NaN``, ``Infinity``, ``-Infinity`` and of a float literal
    beyond a double (``1e309``), so that the check can say where it was."""

    def __init__(self, literal: str):
        self.literal = literal


class _BodyError(Exception):
    def __init__(self, code: str, message: str, loc: list[Any], msg: str):
        super().__init__(message)
        self.code, self.message, self.loc, self.msg = code, message, loc, msg


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth_over(text: str, limit: int) -> bool:
    """Whether a valid JSON text nests arrays and objects deeper than ``limit``: at most
    ``limit`` brackets in all cannot; else strings are removed and the brackets counted."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > limit


def _first_non_finite(value: Any) -> tuple[list[Any], str] | None:
    """Where the first (in document order) non-finite number is, and how it was written."""
    stack: list[tuple[Any, list[Any]]] = [(value, ["body"])]
    while stack:
        v, loc = stack.pop()
        if isinstance(v, _NonFinite):
            return loc, v.literal
        if isinstance(v, dict):
            stack.extend((x, [*loc, k]) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((x, [*loc, i]) for i, x in reversed(list(enumerate(v))))
    return None


def check_json_body(body: bytes) -> None:
    """Raise `_BodyError` unless ``body`` is UTF-8 JSON, at most `MAX_JSON_DEPTH` deep,
    whose numbers are all finite (JSON has no NaN or Infinity, Python's parser accepts
    them, and a value JSON cannot carry back would make the error response itself fail).
    The parser's hooks only flag a non-finite number; the body is walked to name its field
    only then, so a large valid body costs about one more parse."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = body[exc.start:exc.start + 1].hex()
        raise _BodyError("json_invalid", f"The request body is not valid JSON: it is not "
                                         f"UTF-8 (byte {exc.start} is 0x{bad}); send JSON "
                                         "encoded as UTF-8.",
                         ["body", exc.start], "invalid UTF-8") from None
    non_finite = False

    def constant(literal: str) -> _NonFinite:
        nonlocal non_finite
        non_finite = True
        return _NonFinite(literal)

    def number(literal: str) -> Any:
        value = float(literal)
        return value if math.isfinite(value) else constant(literal)

    try:
        value = json.loads(text, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _BodyError("json_invalid", f"The request body is not valid JSON: {exc.msg} at "
                                         f"line {exc.lineno} column {exc.colno}.",
                         ["body", exc.pos], "JSON decode error") from None
    except RecursionError:
        too_deep = True  # deeper than the parser's own limit
    except ValueError:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise _BodyError("json_invalid", f"The request body is not valid JSON: a number has "
                                         f"more than {_MAX_INT_DIGITS} digits.",
                         ["body"], "number too long") from None
    else:
        too_deep = _depth_over(text, MAX_JSON_DEPTH)
    if too_deep:
        raise _BodyError("json_too_deep", f"The request body nests arrays and objects "
                                          f"deeper than {MAX_JSON_DEPTH} levels; flatten it.",
                         ["body"], f"nested deeper than {MAX_JSON_DEPTH} levels")
    found = _first_non_finite(value) if non_finite else None
    if found is not None:
        loc, literal = found
        where = ".".join(str(p) for p in loc[1:]) or "body"
        raise _BodyError("finite_number", f"Invalid request: {where}: {literal} is not a "
                                          "finite number; JSON numbers must be finite (no "
                                          "NaN or Infinity, at most about 1.8e308).",
                         loc, "Input should be a finite number")


def _is_json(scope: Scope) -> bool:
    """A body FastAPI would parse as JSON: content type application/json or */*+json."""
    ctype = dict(scope.get("headers") or []).get(b"content-type")
    if ctype is None:
        return False
    main = ctype.decode("latin-1").split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/")
                                          and main.endswith("+json"))


class JSONBodyCheck:
    """ASGI middleware: a JSON request body is read (within the body limit, which must wrap
    this middleware), checked by `check_json_body`, then handed on unchanged; a bad one gets
    a 422 in the error shape, naming the byte, the line and column, or the field."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS") \
                or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            try:
                check_json_body(body)
            except _BodyError as exc:
                detail = [{"type": exc.code, "loc": exc.loc, "msg": exc.msg, "input": None}]
                param = ".".join(str(p) for p in exc.loc[1:]) \
                    if exc.code == "finite_number" else None
                return await _send_json(send, 422, error_body(
                    422, exc.message, param=param, code=exc.code, detail=detail))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streams

        await self.app(scope, replay, send)


class KeyInURL:
    """ASGI middleware: a request whose query string carries a credential (``?api_key=``,
    ``?key=``, ``?token=``...) is refused with a 401 saying to send it in the Authorization
    header: URLs are written to access logs, proxies' logs and browser histories."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = secret_query_params(scope.get("query_string", b"").decode("latin-1"))
            if names:
                message = (f"Never put an API key in the URL (query parameter "
                           f"{names[0]!r}): URLs are logged; send it in the header "
                           "'Authorization: Bearer <key>', and revoke this key if others may "
                           "have seen it.")
                return await _send_json(send, 401, error_body(
                    401, message, param=names[0], code="api_key_in_url",
                    type="authentication_error"), [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


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

