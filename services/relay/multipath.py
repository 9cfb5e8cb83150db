"""The client end of a multipath request (``PrivacyOptions.paths``, PlanetServe's S-IDA paths):
``n`` onion circuits through disjoint relays to one node, every message in either direction split
into ``n`` S-IDA shares (``native.sida_split``), one per circuit, any ``k`` of which rebuild it.
It reads and writes like one :class:`ClientCircuit`, so the router's serving loop does not change.

Invariants: messages come out whole and in order (each rebuilt from ``k`` shares of its sequence
number, later duplicates dropped); a circuit that fails is dropped and the others carry on; when
fewer than ``k`` remain and the next message cannot be rebuilt, :meth:`receive` raises the
failure (UNAVAILABLE, or DATA_LOSS when the shares received do not authenticate in any
combination of ``k``), so the router can resume the stream elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence

from services.relay.client import CircuitOpener, ClientCircuit, decode_message
from swarmserve import native
from swarmserve.overlay import Peer
from swarmserve.rpc import DataLoss, ServiceError, Unavailable
from swarmserve.v1 import relay_pb2

__all__ = ["MultipathCircuit"]


class MultipathCircuit:
    def __init__(self, circuits: dict[int, ClientCircuit], n: int, k: int, cell_timeout_s: float) -> None:
        self._circuits = circuits  # path index -> circuit; failed ones are removed
        self._n, self._k = n, k
        self._group = os.urandom(16)
        self._cell_timeout_s = cell_timeout_s
        self._sent = 0  # messages sent (the request is 0)
        self._next = 0  # the next answer's sequence number
        self._pending: dict[int, dict[int, bytes]] = {}  # sequence -> path index -> share
        self._incoming: asyncio.Queue[tuple[int, relay_pb2.CircuitMessage | ServiceError]] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []
        self._failure: ServiceError | None = None

    @classmethod
    async def open(
        cls,
        open_circuit: CircuitOpener,
        paths: Sequence[Sequence[Peer]],
        exit_: Peer,
        k: int,
        setup_timeout_s: float,
        cell_timeout_s: float,
    ) -> MultipathCircuit:
        """Opens one circuit per path at once; goes on with those that opened if they are at
        least ``k``, else raises the first failure."""
        opened = await asyncio.gather(
            *(open_circuit(path, exit_, setup_timeout_s, cell_timeout_s) for path in paths),
            return_exceptions=True,
        )
        circuits = {i: c for i, c in enumerate(opened) if isinstance(c, ClientCircuit)}
        if len(circuits) < k:
            for circuit in circuits.values():
                circuit.close()
            failure = next(e for e in opened if isinstance(e, BaseException))
            raise failure
        return cls(circuits, len(paths), k, cell_timeout_s)

    @property
    def alive(self) -> int:
        return len(self._circuits)

    def _drop(self, index: int, error: ServiceError) -> None:
        circuit = self._circuits.pop(index, None)
        if circuit is not None:
            circuit.close()
            self._failure = error

    async def send(self, message: relay_pb2.CircuitMessage) -> None:
        shares = native.sida_split(message.SerializeToString(), self._n, self._k)
        sequence, self._sent = self._sent, self._sent + 1

        async def send_share(index: int, circuit: ClientCircuit) -> None:
            share = relay_pb2.MultipathShare(group=self._group, sequence=sequence, share=shares[index])
            try:
                await circuit.send(relay_pb2.CircuitMessage(share=share))
            except ServiceError as error:
                self._drop(index, error)

        await asyncio.gather(*(send_share(i, c) for i, c in list(self._circuits.items())))
        if len(self._circuits) < self._k:
            raise self._lost()

    def _lost(self) -> ServiceError:
        reason = f": {self._failure}" if self._failure is not None else ""
        code = self._failure.code if self._failure is not None else Unavailable.code
        return ServiceError(f"only {len(self._circuits)} of {self._n} paths remain, {self._k} are needed{reason}", code)

    async def _read(self, index: int, circuit: ClientCircuit) -> None:
        while True:
            try:
                message = await circuit.receive()
            except ServiceError as error:
                await self._incoming.put((index, error))
                return
            await self._incoming.put((index, message))

    async def receive(self) -> relay_pb2.CircuitMessage:
        """The next answer message, rebuilt from ``k`` of its shares."""
        if not self._readers:
            self._readers = [asyncio.create_task(self._read(i, c)) for i, c in self._circuits.items()]
        while True:
            shares = self._pending.get(self._next, {})
            if len(shares) >= self._k:
                rebuilt = self._rebuild(shares)
                if rebuilt is not None:
                    del self._pending[self._next]
                    self._next += 1
                    return decode_message(rebuilt)
            still_to_come = [i for i in self._circuits if i not in shares]
            if len(shares) + len(still_to_come) < self._k:
                raise self._lost()
            if len(shares) >= self._k and not still_to_come:
                raise DataLoss("the shares of an answer do not authenticate in any combination of paths")
            try:
                index, item = await asyncio.wait_for(self._incoming.get(), self._cell_timeout_s)
            except TimeoutError:
                raise Unavailable("no path delivered the next answer in time") from None
            if isinstance(item, ServiceError):
                self._drop(index, item)
                continue
            if item.WhichOneof("body") != "share" or item.share.group != self._group:
                # A node that cannot join the group says so on that path alone.
                reason = item.error.message if item.WhichOneof("body") == "error" else "an unexpected message"
                self._drop(index, ServiceError(f"path {index}: {reason}", Unavailable.code))
                continue
            if item.share.sequence >= self._next:
                self._pending.setdefault(item.share.sequence, {})[index] = item.share.share

    def _rebuild(self, shares: dict[int, bytes]) -> bytes | None:
        """The message from some ``k`` of ``shares`` that authenticate together; None while no
        combination does (a tampered share: the others may still arrive)."""
        for chosen in itertools.combinations(shares.values(), self._k):
            try:
                return native.sida_combine(list(chosen))
            except native.CryptoError:
                continue
        return None

    def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for circuit in self._circuits.values():
            circuit.close()
        self._circuits.clear()
