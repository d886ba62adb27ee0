"""HTTP errors in La Plateforme's JSON shape, and the handlers that guarantee it.

Every error body is ``{"object": "error", "message", "type", "param", "code"}``; request
validation errors (422) also carry pydantic's ``detail`` list, as FastAPI and the SDKs' 422
models expect. A client's mistake is always a 4xx with a sentence naming the fix; a 500 means a
bug here, and its body says so without leaking internals.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from souverain.errors import SouverainError

log = logging.getLogger("souverain.server")

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error",
}


class APIError(Exception):
    """An error response: status, one sentence, and La Plateforme's type/param/code."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None, detail: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "error", "message": message,
                            "type": type or _TYPES.get(status, "invalid_request_error"),
                            "param": param, "code": code}
    if detail is not None:
        body["detail"] = detail
    return body


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, param=err.param, code=err.code,
                                   type=err.type), status_code=err.status, headers=err.headers)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread(fn, *args, **kwargs)``, except that a `StopIteration` escaping ``fn``
    (a bare ``next()`` on an empty iterator) is raised as a `RuntimeError`: asyncio cannot set
    a StopIteration on a future, so with plain ``to_thread`` the request would hang forever
    instead of failing. Every blocking call of the server goes through here."""

    def guarded() -> T:
        try:
            return fn(*args, **kwargs)
        except StopIteration as exc:
            raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} raised StopIteration") \
                from exc

    return await asyncio.to_thread(guarded)


async def call_in_thread(fn: Callable[..., T], *args: Any, errors: type[E],
                         translate: Callable[[E], APIError]) -> T:
    """``fn(*args)`` on a worker thread (it blocks: SQLite, files, parsing), its ``errors``
    raised as the `APIError` that ``translate`` makes of them."""
    try:
        return await in_thread(fn, *args)
    except errors as exc:
        raise translate(exc) from None


def json_safe(value: Any) -> Any:
    """``value`` as something strict JSON can carry, for echoing a client's input back: a
    non-finite float as its text (``inf``, ``nan``), bytes as their repr, anything else
    that is not JSON as ``str``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    detail = []
    for e in exc.errors():
        item = {"type": e.get("type"), "loc": json_safe(list(e.get("loc", ()))),
                "msg": json_safe(e.get("msg"))}
        if "input" in e:
            item["input"] = json_safe(e["input"])
        if e.get("ctx"):
            item["ctx"] = {str(k): json_safe(v) if isinstance(v, (int, float)) else str(v)
                           for k, v in e["ctx"].items()}
        detail.append(item)
    return detail


def _json_invalid(exc: RequestValidationError, first: dict[str, Any]) -> str:
    """"The request body is not valid JSON: <why> at line L column C." (the middleware's
    wording, `middleware.check_json_body`, which catches these first)."""
    why = str((first.get("ctx") or {}).get("error") or "JSON decode error")
    loc = first.get("loc") or []
    doc, pos = exc.body, loc[-1] if loc else None
    if isinstance(doc, str) and isinstance(pos, int):
        line = doc.count("\n", 0, pos) + 1
        column = pos - doc.rfind("\n", 0, pos)
        return f"The request body is not valid JSON: {why} at line {line} column {column}."
    return f"The request body is not valid JSON: {why}."


def allowed_methods(routes: Any, path: str) -> list[str]:
    """The methods of every route whose template matches ``path``. Starlette's 405 lists the
    methods of the first matching route only, and FastAPI makes one route per method."""
    try:
        from fastapi.routing import iter_route_contexts
        contexts: Any = iter_route_contexts(routes)
    except ImportError:  # FastAPI < 0.137: app.routes lists every route
        contexts = routes
    methods: set[str] = set()
    for route in contexts:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path) and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def _parse_failure(exc: BaseException | None) -> str:
    """What FastAPI's "There was an error parsing the body" (a 400) was, in one sentence."""
    if isinstance(exc, UnicodeDecodeError):
        return (f"The request body is not valid UTF-8 (byte {exc.start}); send it encoded as "
                "UTF-8.")
    if isinstance(exc, RecursionError):
        return "The request body is nested too deeply to parse; flatten it."
    if exc is not None and str(exc):
        return f"The request body could not be parsed: {str(exc)[:300].rstrip('.')}."
    return "The request body could not be parsed."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(SouverainError)
    async def _user_error(request: Request, exc: SouverainError) -> JSONResponse:
        # bad prompt, bad sampling value, bad schema, a chat the tokenizer cannot encode ...
        return JSONResponse(error_body(400, str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        first = detail[0] if detail else {}
        if first.get("type") == "json_invalid":  # FastAPI's json.loads failed
            return JSONResponse(error_body(422, _json_invalid(exc, first), code="json_invalid",
                                           detail=detail), status_code=422)
        loc = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        message = (f"Invalid request: {loc}: {first.get('msg')}" if loc
                   else f"Invalid request: {first.get('msg', 'the body is not valid JSON')}")
        if len(detail) > 1:
            message += f" (and {len(detail) - 1} more problem{'s' if len(detail) > 2 else ''})"
        return JSONResponse(error_body(422, message + ".", param=loc or None,
                                       code=first.get("type"), detail=detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if message == "There was an error parsing the body":
            message = _parse_failure(exc.__cause__)
        elif exc.status_code == 404 and message == "Not Found":
            message = (f"No route {request.method} {request.url.path}; see /openapi.json for "
                       "the routes this server offers.")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.routes, request.url.path)
            if allowed:  # every route of the path, not only the first that matched it
                headers["Allow"] = ", ".join(allowed)
            message = (f"Method {request.method} is not allowed on {request.url.path}; it "
                       f"takes {' or '.join(allowed) or 'other methods'} (see /openapi.json).")
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "Internal server error: this is a bug in souverain, "
                                            "not in your request; the server log has the details."),
                            status_code=500)
