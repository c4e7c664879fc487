"""Per-API-key rate limits: requests per second with a burst, and completion tokens per minute.

Token buckets, one per key name and kind, in the replica's memory: the limits hold per replica
(with N replicas a key gets up to N times them), which bounds what one key can take of one
replica's engine without a shared store in the request path. Keys are the configured ones, so the
buckets are bounded too. A refusal is 429 `rate_limit_error` with Retry-After: when the bucket
will hold what was asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service.errors import RateLimited


class TokenBucket:
    """Holds up to `capacity`, refilled at `rate` per second. `level` may go below zero: tokens
    generated are known only afterwards, so they are charged then, and the debt is paid before the
    next request is admitted."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.level, self._at = capacity, now

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now
        return self.level

    def wait(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does now)."""
        return max(0.0, (amount - self.refill(now)) / self.rate)


class RateLimiter:
    def __init__(
        self,
        requests_per_s: float | None,
        burst: int,
        completion_tokens_per_min: int | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._requests_per_s, self._burst = requests_per_s, burst
        self._tokens_per_min = completion_tokens_per_min
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def admit(self, key: str) -> None:
        """Take one request from `key`'s bucket, or raise `RateLimited`."""
        if self._requests_per_s is None:
            return
        now = self._clock()
        bucket = self._requests.get(key)
        if bucket is None:
            bucket = self._requests[key] = TokenBucket(self._requests_per_s, self._burst, now)
        wait = bucket.wait(1.0, now)
        if wait > 0:
            raise RateLimited(
                f"rate limit of {self._requests_per_s:g} requests/s (burst {self._burst}) reached "
                "for this API key",
                code="requests_rate_limit",
                retry_after=wait,
            )
        bucket.level -= 1.0

    def admit_completion(self, key: str) -> None:
        """Raise `RateLimited` while `key` owes completion tokens (its bucket is empty)."""
        bucket = self._token_bucket(key)
        if bucket is None:
            return
        # Any positive level admits a request; what it generates is charged afterwards.
        wait = bucket.wait(1e-9, self._clock())
        if wait > 0:
            raise RateLimited(
                f"rate limit of {self._tokens_per_min} completion tokens/min reached for this "
                "API key",
                code="tokens_rate_limit",
                retry_after=wait,
            )

    def charge(self, key: str, completion_tokens: int) -> None:
        bucket = self._token_bucket(key)
        if bucket is not None:
            bucket.refill(self._clock())
            bucket.level -= completion_tokens

    def _token_bucket(self, key: str) -> TokenBucket | None:
        if self._tokens_per_min is None:
            return None
        bucket = self._tokens.get(key)
        if bucket is None:
            per_min = self._tokens_per_min
            bucket = self._tokens[key] = TokenBucket(per_min / 60, per_min, self._clock())
        return bucket
