"""Client-side pacing and retries for API teachers: a requests/min + tokens/min limiter and a retry policy.

The limiter keeps our own budget so a run stays under the provider's limits instead of learning them from 429s.
The retry policy decides, from an exception, whether a request is worth sending again and how long to wait:
the server's Retry-After when given (never shorter), else exponential backoff with full jitter.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


def est_tokens(messages: list[dict]) -> int:
    """Input tokens estimated as characters / 4 (good enough for pacing and dry runs)."""
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)


class Bucket:
    """A token bucket refilled continuously at `per_minute / 60` per second, holding at most one second's worth
    (but at least one request's cost), so bursts stay small. A cost larger than the bucket drives it negative
    (a debt later acquisitions wait out), so big requests are paced rather than refused."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, cost: float) -> float:
        self._refill()
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost


class RateLimiter:
    """Requests/min and tokens/min limits (either may be None = unlimited). Waiters are served in order."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None):
        self.requests = Bucket(rpm) if rpm else None
        self.tokens = Bucket(tpm) if tpm else None
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    async def acquire(self, requests: int = 1, tokens: float = 0.0) -> None:
        if not self.active:
            return
        async with self._lock:
            while True:
                wait = max(
                    self.requests.wait_time(requests) if self.requests else 0.0,
                    self.tokens.wait_time(tokens) if self.tokens else 0.0,
                )
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests:
                self.requests.take(requests)
            if self.tokens:
                self.tokens.take(tokens)

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the token budget once the real usage is known (refund or charge the difference)."""
        if self.tokens is not None:
            self.tokens.take(actual - estimated)


class MalformedResponse(Exception):
    """A teacher's answer could not be parsed (truncated JSON, missing fields): worth retrying."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # extra attempts after the first
    base: float = 0.5  # seconds; attempt k waits up to base * 2**k
    cap: float = 30.0  # longest backoff (a longer Retry-After is still honoured)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """The server's Retry-After when it gives one (plus up to 20 % jitter so waiters do not return in lockstep),
        else full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt))."""
        rng = rng or random
        if retry_after is not None:
            return retry_after * rng.uniform(1.0, 1.2)
        return rng.uniform(0, min(self.cap, self.base * 2**attempt))


RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}


def classify(exc: BaseException) -> tuple[str, float | None]:
    """('retry' | 'fail' | 'fatal', Retry-After seconds or None) for an exception raised by a teacher.

    Duck-typed over the openai and anthropic SDK errors (both have status_code / response / APIConnectionError),
    so this module imports neither SDK.
    """
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status in RETRY_STATUS or status >= 500:
            return "retry", retry_after(exc)
        return ("fatal" if status in FATAL_STATUS else "fail"), None
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"APIConnectionError", "APITimeoutError", "MalformedResponse"}:
        return "retry", None
    if isinstance(exc, (TimeoutError, ConnectionError, json.JSONDecodeError)):
        return "retry", None
    return "fail", None


def retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
