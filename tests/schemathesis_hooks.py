"""schemathesis hooks and checks for `test_server_robustness.py::test_schemathesis_whole_api`
(loaded by ``st run`` through ``SCHEMATHESIS_HOOKS=schemathesis_hooks``, tests/ on the path).

* ``before_call``: about a third of the generated bodies name a served model (the tiny
  generator, or the embedding model), so that fuzzing reaches generation, embedding and job
  creation and not only the 404 of an unknown model; generations are kept short. The model id
  has no constraint in the schema, so this never turns an invalid case into a valid one or back.
* ``la_plateforme_errors``: every 4xx is La Plateforme's error body (``object``, ``message``,
  ``type``, ``param``, ``code``; a 422 also has pydantic's ``detail`` list).
* ``sse_chunks``: a streamed completion is whole (``data: [DONE]`` last), every event reads
  as our `ChatCompletionChunk`, and the last chunk carries the usage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import schemathesis

from souverain.server.protocol import ChatCompletionChunk

TINY = os.environ.get("SOUVERAIN_FUZZ_MODEL", "tiny")
MAX_LEN = int(os.environ.get("SOUVERAIN_FUZZ_MAX_LEN", "32"))
EMBED = "souverain-embed"
GENERATION = ("/v1/chat/completions", "/v1/fim/completions")


def _pick(value: Any, share: float) -> bool:
    """Deterministically true for about ``share`` of the values (reproducible runs)."""
    return random.Random(hashlib.sha256(repr(value).encode()).digest()).random() < share


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    body, path = case.body, case.operation.path
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        key = sorted(body.items(), key=str)
        if path in GENERATION and _pick(key, 0.35):
            body["model"] = TINY
            mt = body.get("max_tokens")
            if mt is None or (type(mt) is int and 4 < mt <= MAX_LEN):
                # also when absent: an unseeded sample may run to the context's end
                body["max_tokens"] = 4
        elif path == "/v1/embeddings" and _pick(key, 0.2):
            body["model"] = EMBED
        elif path == "/v1/fine_tuning/jobs" and _pick(key, 0.35):
            body["model"] = TINY
    params = case.path_parameters or {}
    if isinstance(params.get("model_id"), str) and _pick(params["model_id"], 0.5):
        params["model_id"] = TINY


def _header(response: Any, name: str) -> str:
    values = response.headers.get(name.lower()) or response.headers.get(name) or [""]
    return values[0] if isinstance(values, list) else values


@schemathesis.check
def la_plateforme_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    if not 400 <= response.status_code < 500:
        return None
    assert _header(response, "content-type").startswith("application/json"), \
        f"a {response.status_code} is not JSON: {response.headers}"
    body = json.loads(response.content)
    assert body.get("object") == "error", body
    assert isinstance(body.get("message"), str) and body["message"], body
    assert isinstance(body.get("type"), str) and body["type"], body
    assert "param" in body and "code" in body, body
    if response.status_code == 422:
        assert isinstance(body.get("detail"), list) and body["detail"], body
    return True


@schemathesis.check
def sse_chunks(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code != 200 or not _header(response, "content-type").startswith(
            "text/event-stream"):
        return None
    text = response.content.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    events = [block[len("data: "):] for block in text[:-2].split("\n\n")]
    assert all(e for e in events) and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks and "usage" in chunks[-1], chunks[-1:]
    return True
