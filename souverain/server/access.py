"""Who may call: the authorization dependency of every route (API key, or the loopback rule
without keys; then the key's rate limit), a key's permission for a model, and the token charge
of a finished request against its key's rate limit."""

from __future__ import annotations

import math

from fastapi import Request

from souverain.audit import note
from souverain.server import state
from souverain.server.auth import APIKeys, AuthError, is_loopback
from souverain.server.errors import APIError
from souverain.server.keyfile import KeyInfo
from souverain.server.ratelimit import RateLimiter


async def authorize(request: Request) -> KeyInfo | None:
    """The caller's key (None without keys), or a 401/403; then a 429 over its rate limit."""
    config = state.config(request)
    key = _authenticate(request, config.api_keys, config.insecure_no_auth)
    limiter = state.limiter(request)
    if limiter is not None:
        wait = limiter.check_request(bucket(key))
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise APIError(429, f"Rate limit reached for this API key; retry in {seconds} s.",
                           code="rate_limited", headers={"Retry-After": str(seconds)})
    if key is not None:
        note(request).update(key_id=key.key_id, key_name=key.name)
    return key


def _authenticate(request: Request, keys: APIKeys | None,
                  insecure_no_auth: bool) -> KeyInfo | None:
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


def check_model(request: Request, key: KeyInfo | None, model: str) -> None:
    """A 403 unless the caller's key may use ``model`` (keys without a model list may)."""
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
