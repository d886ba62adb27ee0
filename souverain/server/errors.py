"""HTTP errors in La Plateforme's JSON shape, and the handlers that guarantee it.

Every error body is ``{"object": "error", "message", "type", "param", "code"}``; request
validation errors (422) also carry pydantic's ``detail`` list, as FastAPI and the SDKs' 422
models expect. A client's mistake is always a 4xx with a sentence naming the fix; a 500 means a
bug here, and its body says so without leaking internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
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


async def call_in_thread(fn: Callable[..., T], *args: Any, errors: type[E],
                         translate: Callable[[E], APIError]) -> T:
    """``fn(*args)`` on a worker thread (it blocks: SQLite, files, parsing), its ``errors``
    raised as the `APIError` that ``translate`` makes of them."""
    try:
        return await asyncio.to_thread(fn, *args)
    except errors as exc:
        raise translate(exc) from None


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    detail = []
    for e in exc.errors():
        item = {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
        if "input" in e:
            item["input"] = e["input"]
        if e.get("ctx"):
            item["ctx"] = {k: str(v) for k, v in e["ctx"].items()}
        detail.append(item)
    return jsonable_encoder(detail)


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
        if exc.status_code == 404 and message == "Not Found":
            message = (f"No route {request.method} {request.url.path}; see /openapi.json for "
                       "the routes this server offers.")
        elif exc.status_code == 405:
            message = (f"Method {request.method} is not allowed on {request.url.path}; see "
                       "/openapi.json.")
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "Internal server error: this is a bug in souverain, "
                                            "not in your request; the server log has the details."),
                            status_code=500)
