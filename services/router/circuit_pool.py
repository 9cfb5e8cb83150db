"""Circuits built before the requests that use them, so that set-up leaves the path of the
first token.

The router keeps, for each (exit, hop count) its requests went to lately, a few circuits ready:
built through relays chosen as a request's would be (``RouterService.choose_relays``: by stake,
no two hops of one operator or network), then held idle until a request to that exit with that
hop count takes one. Invariants:

- one circuit, one request: a taken circuit is the request's and is closed with it; nothing
  ever puts it back;
- a ready circuit is never handed out once it is older than ``max_age_s`` (relays close idle
  circuits: ``CircuitSettings.idle_timeout_s``), once its call has ended, once a hop is not
  alive or holds another onion key than it was built with (it went away, or restarted), or to a
  request that must avoid one of its relays (those are left for others); one that fails before
  the exit answered is the pool's fault, not the exit's: the router builds a circuit anew;
- at most ``per_exit`` are ready for one (exit, hops), ``max_circuits`` in all, ``building`` are
  being built at once, and only for pairs asked for in the last ``demand_window_s``.

Multipath requests build their circuits when they come (their paths must not share a relay).
What a pooled circuit tells its relays and its exit beyond what one built on demand does: that
it was built a while before its first cell; nothing about the request.

:class:`PoolStock` is the bookkeeping (pure, given the clock); :class:`CircuitPool` runs the
refills.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from services.router.config import CircuitPoolSettings
from swarmserve.overlay import Peer
from swarmserve.rpc import ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics

__all__ = ["CircuitPool", "PoolStock", "PooledCircuit"]

log = get_logger("swarmserve.router")


class Closable(Protocol):
    def is_open(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)
Key = tuple[str, int]  # (exit node id, hops)


@dataclass(frozen=True)
class PooledCircuit(Generic[C]):
    relays: Sequence[Peer]
    exit: Peer
    circuit: C
    built_at: float
    onion_keys: tuple[bytes, ...]  # of the relays and the exit when it was built

    @classmethod
    def built(cls, relays: Sequence[Peer], exit_: Peer, circuit: C, now: float) -> PooledCircuit[C]:
        keys = tuple(hop.descriptor.onion_key for hop in [*relays, exit_])
        return cls(relays, exit_, circuit, now, keys)

    def hops_unchanged(self) -> bool:
        """Every hop alive and holding the onion key the circuit was built with (a node that
        restarted has a new one: the circuit through its old process is gone)."""
        hops = [*self.relays, self.exit]
        return all(
            hop.alive and hop.descriptor.onion_key == key for hop, key in zip(hops, self.onion_keys, strict=True)
        )


class PoolStock(Generic[C]):
    """The ready circuits and the demand for them."""

    def __init__(self, settings: CircuitPoolSettings) -> None:
        self._settings = settings
        self._ready: dict[Key, deque[PooledCircuit[C]]] = {}
        self._asked: dict[Key, float] = {}  # when a request last went to the pair
        self.building: Counter[Key] = Counter()
        self.taken = Counter({"hit": 0, "miss": 0})

    def __len__(self) -> int:
        return sum(len(ready) for ready in self._ready.values())

    def ready(self, key: Key) -> list[PooledCircuit[C]]:
        return list(self._ready.get(key, ()))

    def take(self, key: Key, now: float, usable: Callable[[Sequence[Peer]], bool]) -> PooledCircuit[C] | None:
        """A ready circuit for ``key`` whose relays pass ``usable``, or None; records the demand.
        Stale and dead ones met on the way are closed."""
        self._asked[key] = now
        ready = self._ready.get(key, deque())
        for entry in list(ready):
            if not self._fresh(entry, now):
                ready.remove(entry)
                entry.circuit.close()
            elif usable(entry.relays):
                ready.remove(entry)
                self.taken["hit"] += 1
                return entry
        self.taken["miss"] += 1
        return None

    def add(self, key: Key, entry: PooledCircuit[C]) -> None:
        self._ready.setdefault(key, deque()).append(entry)

    def wanted(self, now: float) -> list[Key]:
        """One pair to build a circuit for now, per free building place, the emptiest first."""
        settings = self._settings
        self._forget_demand(now)
        held = len(self) + sum(self.building.values())
        places = min(settings.building - sum(self.building.values()), settings.max_circuits - held)
        short = sorted(
            (len(self._ready.get(key, ())) + self.building[key], key)
            for key in self._asked
            if len(self._ready.get(key, ())) + self.building[key] < settings.per_exit
        )
        return [key for _, key in short[: max(0, places)]]

    def expire(self, now: float) -> None:
        """Closes the ready circuits that may no longer be handed out, and those of pairs no
        longer asked for."""
        self._forget_demand(now)
        for key, ready in list(self._ready.items()):
            for entry in list(ready):
                if key not in self._asked or not self._fresh(entry, now):
                    ready.remove(entry)
                    entry.circuit.close()
            if not ready:
                del self._ready[key]

    def close(self) -> None:
        for ready in self._ready.values():
            for entry in ready:
                entry.circuit.close()
        self._ready.clear()

    def _forget_demand(self, now: float) -> None:
        for key, asked in list(self._asked.items()):
            if now - asked > self._settings.demand_window_s:
                del self._asked[key]

    def _fresh(self, entry: PooledCircuit[C], now: float) -> bool:
        return now - entry.built_at < self._settings.max_age_s and entry.circuit.is_open() and entry.hops_unchanged()


class CircuitPool(Generic[C]):
    """Keeps :class:`PoolStock` filled: ``build(exit, hops)`` makes a circuit (the relays and
    the open circuit), ``find(node_id)`` says whether an exit is still a live member."""

    def __init__(
        self,
        settings: CircuitPoolSettings,
        build: Callable[[Peer, int], Awaitable[tuple[Sequence[Peer], C]]],
        find: Callable[[str], Peer | None],
    ) -> None:
        self.settings = settings
        self.stock: PoolStock[C] = PoolStock(settings)
        self._build = build
        self._find = find
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._builds: set[asyncio.Task[None]] = set()

    def report_to(self, metrics: NodeMetrics) -> None:
        stock = self.stock
        metrics.read("swarmserve_router_circuit_pool_ready", "circuits built and waiting for a request", stock.__len__)
        metrics.read_counter(
            "swarmserve_router_circuit_pool_takes",
            "requests that found a ready circuit (hit) or built their own (miss)",
            lambda: stock.taken,
            ["outcome"],
        )

    def take(self, exit_: Peer, hops: int, usable: Callable[[Sequence[Peer]], bool]) -> PooledCircuit[C] | None:
        if not self.settings.enabled:
            return None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refill())
        entry = self.stock.take((exit_.node_id, hops), time.monotonic(), usable)
        self._wake.set()  # one taken (or missed): build its successor
        return entry

    async def _refill(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.max_age_s / 4)
            self._wake.clear()
            now = time.monotonic()
            self.stock.expire(now)
            for key in self.stock.wanted(now):
                exit_ = self._find(key[0])
                if exit_ is None or not exit_.alive:
                    continue
                self.stock.building[key] += 1
                task = asyncio.create_task(self._build_one(key, exit_))
                self._builds.add(task)
                task.add_done_callback(self._builds.discard)

    async def _build_one(self, key: Key, exit_: Peer) -> None:
        try:
            relays, circuit = await self._build(exit_, key[1])
            self.stock.add(key, PooledCircuit.built(relays, exit_, circuit, time.monotonic()))
        except ServiceError as error:
            log.info("pooled circuit not built", exit=key[0][:16], hops=key[1], reason=str(error))
            await asyncio.sleep(1.0)  # a failing pair is not rebuilt in a tight loop
        finally:
            self.stock.building[key] -= 1
            self._wake.set()

    async def close(self) -> None:
        for task in [self._task, *self._builds]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.stock.close()
