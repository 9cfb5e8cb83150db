"""The router's recent requests, for the dashboard's charts: request rate and time to first token
over the last minutes, in fixed steps. Bounded: entries older than the window are dropped as new
ones arrive. (Prometheus keeps the long history: ``/metrics``.)"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["RecentRequests", "SeriesPoint"]


@dataclass(frozen=True)
class SeriesPoint:
    start_unix_s: float  # the step's start
    requests_per_s: float  # requests that ended in the step, per second
    failed: int  # of which failed
    ttft_p50_s: float | None  # median time to first token of those that got one


class RecentRequests:
    def __init__(self, window_s: float = 600.0) -> None:
        self.window_s = window_s
        self._ended: deque[tuple[float, float | None, bool]] = deque()  # (when, ttft, ok)

    def record(self, ttft_s: float | None, ok: bool, at: float | None = None) -> None:
        now = time.time() if at is None else at
        self._ended.append((now, ttft_s, ok))
        while self._ended and self._ended[0][0] < now - self.window_s:
            self._ended.popleft()

    def series(self, span_s: float = 300.0, step_s: float = 10.0, now: float | None = None) -> list[SeriesPoint]:
        """``span_s`` seconds up to ``now`` in steps of ``step_s``, oldest first."""
        now = time.time() if now is None else now
        steps = max(1, int(span_s // step_s))
        first = now - steps * step_s
        buckets: list[list[tuple[float | None, bool]]] = [[] for _ in range(steps)]
        for when, ttft, ok in self._ended:
            index = int((when - first) // step_s)
            if 0 <= index < steps:
                buckets[index].append((ttft, ok))
        points = []
        for index, bucket in enumerate(buckets):
            ttfts = [ttft for ttft, _ in bucket if ttft is not None]
            points.append(
                SeriesPoint(
                    start_unix_s=first + index * step_s,
                    requests_per_s=len(bucket) / step_s,
                    failed=sum(1 for _, ok in bucket if not ok),
                    ttft_p50_s=statistics.median(ttfts) if ttfts else None,
                )
            )
        return points
