"""Per-key rate limits (token buckets) and bounded admission of requests.

:class:`RateLimiter` keeps, per ``key_id``, a request bucket (``requests_per_minute``) and
optionally a token bucket (``tokens_per_minute``, prompt + completion tokens charged after a
request). Each bucket holds at most one minute of budget (the burst is the per-minute amount)
and refills continuously. A request is refused while the request bucket has less than one
request left or the token bucket is negative (a request may overdraw it: its size is only
known afterwards). Buckets that are full again are dropped, so memory stays bounded by the
keys active in the last minute or so.

:class:`AdmissionQueue` caps how many requests are admitted (running or waiting for the
engine) at once, so a flood of requests is answered 429/503 at the door instead of growing
queues without bound.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SWEEP_INTERVAL_S = 60.0


def retry_after(seconds: float) -> str:
    """The ``Retry-After`` header value for a wait: whole seconds rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


@dataclass
class _Bucket:
    requests: float
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per key_id; thread-safe. ``None`` for a limit means unlimited."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(
                    f"{name} must be a positive number or None (unlimited), got {value!r}."
                )
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        # Capacity: one minute of budget, but never below one request / one token, or a
        # fractional per-minute limit could never admit anything.
        self._req_cap = max(1.0, float(requests_per_minute)) if requests_per_minute else math.inf
        self._tok_cap = max(1.0, float(tokens_per_minute)) if tokens_per_minute else math.inf
        self._req_rate = requests_per_minute / 60.0 if requests_per_minute else 0.0
        self._tok_rate = tokens_per_minute / 60.0 if tokens_per_minute else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def __len__(self) -> int:
        """How many buckets are held (keys not yet back to a full budget)."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(requests_per_minute={self.requests_per_minute}, "
            f"tokens_per_minute={self.tokens_per_minute}, buckets={len(self._buckets)})"
        )

    # -- internals (lock held) ---------------------------------------------------------------
    def _refill(self, b: _Bucket, now: float) -> None:
        dt = max(0.0, now - b.stamp)
        b.stamp = now
        if self.requests_per_minute:
            b.requests = min(self._req_cap, b.requests + dt * self._req_rate)
        if self.tokens_per_minute:
            b.tokens = min(self._tok_cap, b.tokens + dt * self._tok_rate)

    def _full(self, b: _Bucket) -> bool:
        return (not self.requests_per_minute or b.requests >= self._req_cap) and (
            not self.tokens_per_minute or b.tokens >= self._tok_cap
        )

    def _bucket(self, key_id: str, now: float) -> _Bucket:
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Bucket(self._req_cap, self._tok_cap, now)
        else:
            self._refill(b, now)
        return b

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for key_id in list(self._buckets):
            b = self._buckets[key_id]
            self._refill(b, now)
            if self._full(b):  # indistinguishable from a fresh bucket
                del self._buckets[key_id]

    # -- API ------------------------------------------------------------------------------------
    def check_request(self, key_id: str) -> float | None:
        """None if the request may go (one request consumed), else the seconds to wait."""
        if not self.enabled:
            return None
        with self._lock:
            now = self._clock()
            self._maybe_sweep(now)
            b = self._bucket(key_id, now)
            wait = 0.0
            if self.tokens_per_minute and b.tokens < 0:
                wait = max(wait, -b.tokens / self._tok_rate)
            if self.requests_per_minute and b.requests < 1.0:
                wait = max(wait, (1.0 - b.requests) / self._req_rate)
            if wait > 0:
                return wait
            if self.requests_per_minute:
                b.requests -= 1.0
            return None

    async def check_request_async(self, key_id: str) -> float | None:
        """`check_request` for the event loop (a shared limiter awaits its actor here)."""
        return self.check_request(key_id)

    def charge_tokens(self, key_id: str, n: int) -> None:
        """Charge ``n`` tokens (prompt + completion) used by a finished request; may overdraw."""
        if not self.tokens_per_minute or n <= 0:
            return
        with self._lock:
            now = self._clock()
            b = self._bucket(key_id, now)
            b.tokens -= n


class AdmissionQueue:
    """Counts admitted (running + queued) requests; refuses beyond ``max_pending``. Thread-safe."""

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}.")
        self.max_pending = int(max_pending)
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def try_acquire(self) -> bool:
        """Take a slot if one is free (True); never blocks."""
        with self._lock:
            if self._pending >= self.max_pending:
                return False
            self._pending += 1
            return True

    def release(self) -> None:
        """Give a slot back (exactly once per successful :meth:`try_acquire`)."""
        with self._lock:
            if self._pending <= 0:
                raise RuntimeError(
                    "AdmissionQueue.release() called more times than try_acquire() succeeded."
                )
            self._pending -= 1

    def __repr__(self) -> str:
        return f"AdmissionQueue(pending={self._pending}, max_pending={self.max_pending})"
