"""What /openapi.json says beyond FastAPI's defaults: the error responses of each route, the
``text/event-stream`` media type of streamed completions, integer bounds kept integers, and
the links from each create operation to the operations on what it made (so that clients and
fuzzers such as schemathesis can follow a library, document, file or job from its id)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from souverain.server.protocol import ChatCompletionChunk, ErrorBody

_ERROR_TEXT = {400: "Invalid request", 401: "Missing or invalid API key",
               403: "Not allowed", 404: "Unknown model", 409: "Conflicts with the current state",
               410: "Model withdrawn (the message names its replacement)",
               413: "Request body too large",
               422: "Request does not match the schema", 429: "Rate limit or queue full",
               503: "Model cannot be loaded now"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these error statuses (`ErrorBody`)."""
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


GENERATION_ERRORS = error_responses(400, 401, 403, 404, 410, 413, 422, 429, 503)


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


_PARAM = re.compile(r"\{(\w+)\}")


def _links(doc: dict[str, Any]) -> None:
    """OpenAPI links from ``POST /collection`` (whose answer has the new item's ``id``) to
    each operation on ``/collection/{param}[/...]`` that needs no other new parameter: the
    new parameter from ``$response.body#/id``, the others from the request's path."""
    paths: dict[str, Any] = doc.get("paths", {})
    for collection, item in paths.items():
        create = item.get("post")
        if create is None:
            continue
        known = set(_PARAM.findall(collection))
        links: dict[str, Any] = {}
        for path, ops in paths.items():
            m = re.fullmatch(re.escape(collection) + r"/\{(\w+)\}(/[^{}]*)?", path)
            if m is None:
                continue
            params = {name: f"$request.path.{name}" for name in known}
            params[m[1]] = "$response.body#/id"
            for op in ops.values():
                if isinstance(op, dict) and op.get("operationId"):
                    links[op["operationId"]] = {"operationId": op["operationId"],
                                                "parameters": dict(params)}
        success = next((code for code in create.get("responses", {})
                        if str(code).startswith("2")), None)
        if links and success is not None:
            create["responses"][success]["links"] = links


def _security(doc: dict[str, Any], app: FastAPI) -> None:
    """With API keys: the bearer scheme, required by every operation that `authorize`s (all
    but /health). Without keys, loopback clients need none, and the document says none."""
    from fastapi.routing import APIRoute

    from souverain.server.access import authorize

    if getattr(app.state.config, "api_keys", None) is None:
        return
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["APIKey"] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key made by `souverain keys add`: 'Authorization: Bearer <key>'."}

    def calls(dependant: Any) -> Iterator[Any]:
        for sub in dependant.dependencies:
            yield sub.call
            yield from calls(sub)

    try:
        from fastapi.routing import iter_route_contexts
        routes: Any = iter_route_contexts(app.routes)
    except ImportError:  # FastAPI < 0.137
        routes = [r for r in app.routes if isinstance(r, APIRoute)]
    for route in routes:
        dependant = getattr(route, "dependant", None)
        if dependant is None or authorize not in calls(dependant):
            continue
        for method in route.methods or ():
            op = doc.get("paths", {}).get(route.path, {}).get(method.lower())
            if op is not None:
                op["security"] = [{"APIKey": []}]


def install_openapi(app: FastAPI) -> None:
    """Serve FastAPI's document for ``app``, built once, with integer bounds as integers, the
    create operations' links, and the API key scheme when the server has keys."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            _int_bounds(doc)
            _links(doc)
            _security(doc, app)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
