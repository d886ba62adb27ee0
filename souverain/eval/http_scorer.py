"""A moderation scorer over HTTP: ``POST {url}/v1/moderations`` as La Plateforme documents it.

The request is ``{"model": ..., "input": [texts]}``; the answer's ``results[i].category_scores``
are the i-th text's scores (the SDK's `ModerationResponse`). It works against `souverain serve`
and against any La Plateforme-compatible server (``https://api.mistral.ai`` with a key).

Only the standard library (urllib): the evaluation needs no HTTP client package. A 429 or 503
is retried after its ``Retry-After`` (at most ``retries`` times); any other refusal is an
`EvalError` carrying the server's own message and the fix.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from souverain.eval import EvalError

RETRYABLE = (429, 502, 503)


def moderations_url(url: str) -> str:
    """The moderations endpoint of a base URL given with or without ``/v1``."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EvalError(f"--url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    if base.endswith("/v1/moderations"):
        return base
    return (base if base.endswith("/v1") else base + "/v1") + "/moderations"


def _error_message(body: bytes) -> str:
    """The message of La Plateforme's (or FastAPI's) error body, else the body's start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip() or "no message"
    if isinstance(obj, dict):
        msg = obj.get("message") or obj.get("detail") or obj.get("error")
        if isinstance(msg, dict):
            msg = msg.get("message")
        if msg:
            return msg if isinstance(msg, str) else json.dumps(msg)[:300]
    return json.dumps(obj)[:300]


class HttpModerationScorer:
    """``score(texts) -> [{category: score}]`` through a server's ``/v1/moderations``."""

    def __init__(self, url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 120.0, retries: int = 5) -> None:
        self.endpoint = moderations_url(url)
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries

    def _post(self, payload: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers,
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                status, message = exc.code, _error_message(exc.read())
                if status in RETRYABLE and attempt < self.retries:
                    time.sleep(_retry_after(exc.headers.get("Retry-After"), attempt))
                    continue
                raise EvalError(self._refusal(status, message)) from None
            except urllib.error.URLError as exc:
                raise EvalError(f"cannot reach {self.endpoint} ({exc.reason}); start the "
                                f"server (`souverain serve --moderation-model ...`) or fix "
                                f"--url") from None
            except TimeoutError:
                raise EvalError(f"{self.endpoint} did not answer within {self.timeout_s:g} s; "
                                f"raise --timeout or lower --batch-size") from None
            try:
                return json.loads(body)
            except ValueError:
                raise EvalError(f"{self.endpoint} answered something that is not JSON; is "
                                f"--url a La Plateforme-compatible server?") from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _refusal(self, status: int, message: str) -> str:
        fix = {401: "pass --api-key (or set MISTRAL_API_KEY)",
               403: "use a key allowed for this model, or run the evaluation on the "
                    "server's machine",
               404: "check --model (GET /v1/models lists the served models) and --url"}
        hint = fix.get(status, "see the server's message")
        return f"{self.endpoint} refused the request (HTTP {status}: {message}); {hint}"

    def __call__(self, texts: list[str]) -> list[dict[str, float]]:
        answer = self._post({"model": self.model, "input": texts})
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            raise EvalError(f"{self.endpoint} answered without a 'results' list; expected "
                            f"La Plateforme's moderation response")
        scores = []
        for result in results:
            cat_scores = result.get("category_scores") if isinstance(result, dict) else None
            if not isinstance(cat_scores, dict):
                raise EvalError(f"{self.endpoint} answered a result without "
                                f"'category_scores'; expected La Plateforme's moderation "
                                f"response")
            scores.append(cat_scores)
        return scores


def _retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before retrying: the server's Retry-After, else 1, 2, 4... (at most 30)."""
    try:
        return min(max(float(header), 0.0), 30.0) if header else min(2.0 ** attempt, 30.0)
    except ValueError:
        return min(2.0 ** attempt, 30.0)
