"""Admission: at most ``max_concurrent`` requests run, at most ``max_queue`` wait (first come,
first served), and a request that finds the queue full is refused at once. Keeps the recent
queue waits, latencies and speeds that ``Status`` and the node's descriptor report."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from swarmserve.rpc import ResourceExhausted

__all__ = ["Admission", "LoadSnapshot"]

_WINDOW = 256  # recent requests the statistics cover


@dataclass(frozen=True)
class LoadSnapshot:
    running: int
    queued: int
    queued_tokens: int
    mean_queue_wait_s: float
    p99_queue_wait_s: float
    recent_latency_s: float
    tokens_per_second: float


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._running = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._queued_tokens = 0
        self._waits: deque[float] = deque(maxlen=_WINDOW)
        self._latencies: deque[float] = deque(maxlen=_WINDOW)
        self._speeds: deque[float] = deque(maxlen=_WINDOW)

    @asynccontextmanager
    async def slot(self, cost_tokens: int) -> AsyncIterator[float]:
        """Holds a slot for the body; yields the seconds spent queueing. Raises
        ResourceExhausted at once when every slot is busy and the queue is full."""
        started = time.monotonic()
        if self._running < self.max_concurrent and not self._waiters:
            self._running += 1
        else:
            if len(self._waiters) >= self.max_queue:
                raise ResourceExhausted(
                    f"node is full: {self._running} running, {len(self._waiters)} queued "
                    f"(max_queue {self.max_queue}); retry later or use another node"
                )
            await self._wait_for_slot(cost_tokens)
        waited = time.monotonic() - started
        self._waits.append(waited)
        try:
            yield waited
        finally:
            self._release()

    async def _wait_for_slot(self, cost_tokens: int) -> None:
        entry = (asyncio.get_running_loop().create_future(), cost_tokens)
        self._waiters.append(entry)
        self._queued_tokens += cost_tokens
        try:
            await entry[0]
        except asyncio.CancelledError:
            if entry[0].done() and not entry[0].cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            self._queued_tokens -= cost_tokens

    def _release(self) -> None:
        # Hand the slot straight to the oldest live waiter, or free it.
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._running -= 1

    def record(self, latency_s: float, tokens: int, generating_s: float) -> None:
        """Records a finished request for the load statistics."""
        self._latencies.append(latency_s)
        if generating_s > 0 and tokens:
            self._speeds.append(tokens / generating_s)

    def snapshot(self) -> LoadSnapshot:
        waits = sorted(self._waits)
        return LoadSnapshot(
            running=self._running,
            queued=len(self._waiters),
            queued_tokens=self._queued_tokens,
            mean_queue_wait_s=sum(waits) / len(waits) if waits else 0.0,
            p99_queue_wait_s=waits[min(len(waits) - 1, int(len(waits) * 0.99))] if waits else 0.0,
            recent_latency_s=sum(self._latencies) / len(self._latencies) if self._latencies else 0.0,
            tokens_per_second=sum(self._speeds) / len(self._speeds) if self._speeds else 0.0,
        )
