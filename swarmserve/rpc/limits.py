"""Token buckets per key (a sender, a source address): the one rate limiter the services share.
Pure logic with an injectable clock; bounded in the keys it tracks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TokenBuckets"]


@dataclass
class _Bucket:
    tokens: float
    updated: float
    factor: float


class TokenBuckets:
    def __init__(
        self, rate: float, burst: float, max_keys: int = 65_536, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(
        self, key: str, factor: Callable[[], float] = lambda: 1.0, busy: Callable[[str], bool] = lambda _: False
    ) -> bool:
        """Spends one token of ``key``'s bucket (rate and burst times ``factor``, asked when the key
        is first seen); False, spending nothing, when it is empty or no key can be tracked.
        ``busy(key)``: keys that must not be forgotten to make room (they hold something open)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_idle(now, busy)
            if len(self._buckets) >= self._max_keys:
                return False
            f = factor()
            bucket = self._buckets[key] = _Bucket(self._burst * f, now, f)
        bucket.tokens = min(
            self._burst * bucket.factor, bucket.tokens + (now - bucket.updated) * self._rate * bucket.factor
        )
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def factor(self, key: str) -> float:
        bucket = self._buckets.get(key)
        return bucket.factor if bucket else 1.0

    def _forget_idle(self, now: float, busy: Callable[[str], bool]) -> None:
        # A bucket that has refilled is the same as a new one: forgetting it gifts nothing.
        refill_s = self._burst / self._rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= refill_s and not busy(k)]:
            del self._buckets[key]
