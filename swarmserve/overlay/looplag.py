"""How late this node's event loop runs: a timer task sleeps a fixed interval and reports each
wake-up that came more than ``threshold_s`` after it was due. Everything on the loop waits
behind whatever keeps it busy (hundreds of streams, a blocking call, a process the machine does
not schedule), the answers to probes included; a late timer is the cheapest direct measure of
that, and it needs no peer to notice it.

Invariants: ``on_late(lag_s)`` is called once per late wake-up, with ``lag_s > threshold_s``;
``late`` counts those calls; ``worst_s`` is the largest lag measured since the task started (late
or not). Cost: one wake-up per ``interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["LoopLag"]


class LoopLag:
    def __init__(self, interval_s: float, threshold_s: float, on_late: Callable[[float], None]) -> None:
        if interval_s <= 0 or threshold_s < 0:
            raise ValueError("interval_s must be positive and threshold_s not negative")
        self.interval_s = interval_s
        self.threshold_s = threshold_s
        self._on_late = on_late
        self.late = 0
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts measuring on the running loop (again, after :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = loop.time() - due
            self.worst_s = max(self.worst_s, lag)
            if lag > self.threshold_s:
                self.late += 1
                self._on_late(lag)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
