"""What /openapi.json says beyond FastAPI's defaults: the error responses of each route, the
``text/event-stream`` media type of streamed completions, and integer bounds kept integers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from souverain.server.protocol import ChatCompletionChunk, ErrorBody

_ERROR_TEXT = {400: "Invalid request", 401: "Missing or invalid API key",
               403: "Not allowed", 404: "Unknown model", 413: "Request body too large",
               422: "Request does not match the schema", 429: "Rate limit or queue full",
               503: "Model cannot be loaded now"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these error statuses (`ErrorBody`)."""
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


GENERATION_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 503)


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined: in /openapi.json a ``#/$defs/..``
    reference would resolve against the document root, where there is no ``$defs``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x: Any) -> Any:
        if isinstance(x, dict):
            ref = x.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in x.items() if k != "$ref"}
                return inline({**defs[ref[len("#/$defs/"):]], **rest})
            return {k: inline(v) for k, v in x.items()}
        if isinstance(x, list):
            return [inline(v) for v in x]
        return x

    return inline(schema)


def sse_chunks() -> dict[str, Any]:
    """The ``text/event-stream`` media type of a streamed completion, as FastAPI documents SSE
    (OpenAPI 3.2 ``itemSchema``: one SSE event): ``data`` is a chunk as JSON, or ``[DONE]``."""
    return {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"type": "string", "const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": _inline_schema(ChatCompletionChunk)}]}}}}


def _int_bounds(node: Any) -> None:
    """Write the bounds of integer schemas as integers: FastAPI's OpenAPI models turn them into
    floats (``0.0``, and ``9.223372036854775e+18`` whose decimal value is not the bound)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                v = node.get(k)
                if isinstance(v, float) and v.is_integer():
                    node[k] = int(v)
        for v in node.values():
            _int_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _int_bounds(v)


def install_openapi(app: FastAPI) -> None:
    """Serve FastAPI's document for ``app``, built once, with integer bounds as integers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _int_bounds(FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
