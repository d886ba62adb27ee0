"""Who may call: the authorization dependency of every route (API key, or the loopback rule
without keys; then the key's rate limit), a key's permission for a model, and the token charge
of a finished request against its key's rate limit. Also what keeps keys out of logs: the
query parameters that carry one (refused by `middleware.KeyInURL`), and the filter that
redacts them in uvicorn's access log."""

from __future__ import annotations

import logging
import math
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import Request

from souverain.audit import note
from souverain.redact import SECRET, SECRET_NAME, redact_secrets
from souverain.server import state
from souverain.server.auth import APIKeys, AuthError, is_loopback
from souverain.server.errors import APIError
from souverain.server.evaluations import gate_key
from souverain.server.keyfile import KeyInfo
from souverain.server.ratelimit import RateLimiter


async def authorize(request: Request) -> KeyInfo | None:
    """The caller's key (None without keys), or a 401/403; then a 429 over its rate limit."""
    key = await authorize_unmetered(request)
    limiter = state.limiter(request)
    if limiter is not None:
        wait = await limiter.check_request_async(bucket(key))
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise APIError(429, f"Rate limit reached for this API key; retry in {seconds} s.",
                           code="rate_limited", headers={"Retry-After": str(seconds)})
    return key


async def authorize_unmetered(request: Request) -> KeyInfo | None:
    """`authorize` without the rate limit: ``/metrics``, which Prometheus (every 15 s) and the
    console's health page (every 2 s) read, must not spend a key's request budget."""
    config = state.config(request)
    key = _authenticate(request, config.api_keys, config.insecure_no_auth)
    if key is not None:
        note(request).update(key_id=key.key_id, key_name=key.name)
    return key


def _authenticate(request: Request, keys: APIKeys | None,
                  insecure_no_auth: bool) -> KeyInfo | None:
    gate = gate_key(state.evaluations(request).keeper, request.headers.get("authorization"))
    if gate is not None:  # the release gate's own per-process key
        return gate
    try:
        if keys is not None:
            return keys.authenticate(request.headers.get("authorization"))
        if insecure_no_auth:
            return None
        if not is_loopback(request.client.host if request.client else None):
            raise APIError(403, "This server has no API keys configured, so it only answers "
                                "clients on this machine; start it with --api-keys-file "
                                "(or --insecure-no-auth on a trusted network).",
                           code="no_api_keys")
        return None
    except AuthError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        raise APIError(exc.status, exc.message, code=exc.code, headers=headers) from None


def check_model(request: Request, key: KeyInfo | None, model: str) -> str:
    """The model that serves a request for ``model``: a 403 unless the caller's key may use
    it (keys without a model list may), then its lifecycle (`LifecycleService.route`: 410 when
    withdrawn, or the replacement with fallback, which the key must be allowed too)."""
    _check_key(request, key, model)
    used = state.lifecycle(request).route(request, model)
    if used != model:
        _check_key(request, key, used)
        note(request)["lifecycle"] = {"replaced": f"{model} -> {used}"}
    # a fine-tuned model its release gate holds: 403 unless the caller may evaluate it
    state.evaluations(request).check_released(request, key, used)
    return used


def _check_key(request: Request, key: KeyInfo | None, model: str) -> None:
    keys = state.config(request).api_keys
    if key is not None and keys is not None:
        try:
            keys.check_model(key, model)
        except AuthError as exc:
            raise APIError(exc.status, exc.message, code=exc.code) from None


def bucket(key: KeyInfo | None) -> str:
    """The rate-limit bucket of a request: its key id, or one shared bucket without keys."""
    return key.key_id if key else "anonymous"


def charge_tokens(limiter: RateLimiter | None, key: KeyInfo | None, n: int) -> None:
    """Charge a finished request's prompt + completion tokens to its key's token budget."""
    if limiter is not None:
        limiter.charge_tokens(bucket(key), n)


# -- keys out of URLs and logs ---------------------------------------------------------------
def secret_query_params(query: str) -> list[str]:
    """The names of the query parameters that carry a credential: named like one (``api_key``,
    ``key``, ``token``, ``access_token``, ``password``...) or with a key-shaped value."""
    names = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if value and (name.lower() == "key" or SECRET_NAME.search(name)
                      or redact_secrets(value) != value):
            names.append(name)
    return names


def redact_query(target: str) -> str:
    """A request target (path + query) with the credentials of its query replaced by
    ``[SECRET]``; a target without any is returned as it is."""
    path, sep, query = target.partition("?")
    if not sep or not secret_query_params(query):
        return target
    parts = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        secret = value and (name.lower() == "key" or SECRET_NAME.search(name)
                            or redact_secrets(value) != value)
        parts.append(f"{quote(name)}={SECRET if secret else quote(value)}")
    return f"{path}?{'&'.join(parts)}"


class AccessLogRedaction(logging.Filter):
    """On uvicorn's access logger: the request target of each line with its query's
    credentials redacted (uvicorn logs ``'%s - "%s %s HTTP/%s" %d'``, the target third)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            target = args[2]
            if "?" in target and urlsplit(target).query:
                record.args = (*args[:2], redact_query(target), *args[3:])
        return True
