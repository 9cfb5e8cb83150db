"""The ``Relay`` gRPC service: one bidirectional stream per circuit.

A forwarding relay peels exactly one set-up layer, learns only where to send the rest, opens the
next hop, and then moves cells both ways (forward cells lose its layer, backward cells gain
one). A node that terminates circuits (an inference node) installs a :class:`Terminus`, which
receives the plaintext of forward cells and returns the plaintext of backward ones. Payloads
are never logged or stored; teardown on either side ends both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc import aio

from services.relay.circuit import CIRCUIT_READY, create_cell, created_cell, data_cell, destroy_cell
from services.relay.config import CircuitSettings
from services.relay.limits import SourceLimits, host_of, source_of
from swarmserve import native
from swarmserve.config import parse_listen_address
from swarmserve.keys import OnionKeyRing
from swarmserve.overlay import PeerDirectory
from swarmserve.rpc import STREAM_EOF, ChannelPool, InvalidArgument, ResourceExhausted, open_stream
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics
from swarmserve.v1 import relay_pb2, relay_pb2_grpc

__all__ = ["RelayServicer", "Terminus", "destroy_reason_for"]

log = get_logger("swarmserve.relay")

_REASON_FOR_CODE = {
    grpc.StatusCode.ALREADY_EXISTS: relay_pb2.DESTROY_REASON_REPLAY,
    grpc.StatusCode.RESOURCE_EXHAUSTED: relay_pb2.DESTROY_REASON_RESOURCE_LIMIT,
    grpc.StatusCode.INVALID_ARGUMENT: relay_pb2.DESTROY_REASON_PROTOCOL_ERROR,
    grpc.StatusCode.DEADLINE_EXCEEDED: relay_pb2.DESTROY_REASON_TIMEOUT,
}


def destroy_reason_for(code: grpc.StatusCode) -> relay_pb2.DestroyReason.ValueType:
    """How a failed call to the next hop is reported back along the circuit."""
    return _REASON_FOR_CODE.get(code, relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)


class Terminus(Protocol):
    """The end of a circuit: turns the plaintext of forward cells into backward plaintexts."""

    def handle(self, forward: AsyncIterator[bytes]) -> AsyncIterator[bytes]: ...


@dataclass
class RelayCounters:
    """What this relay forwarded and refused, since it started (read by ``/metrics``)."""

    cells: Counter[str] = field(default_factory=lambda: Counter({"forward": 0, "backward": 0}))
    bytes: Counter[str] = field(default_factory=lambda: Counter({"forward": 0, "backward": 0}))
    refused: Counter[str] = field(default_factory=Counter)  # set-ups, by reason

    def forwarded(self, direction: str, size: int) -> None:
        self.cells[direction] += 1
        self.bytes[direction] += size


class RelayServicer(relay_pb2_grpc.RelayServicer):
    """Admits a set-up in this order, so that refused ones cost the relay as little as possible:
    the relay-wide circuit limit, the source's own allowance (:class:`SourceLimits`, charged for
    junk too), the onion layer, the next hop (a known member), and only then the replay tag
    (:class:`OnionKeyRing`), which is remembered for accepted set-ups alone."""

    def __init__(
        self,
        onion_keys: OnionKeyRing,
        settings: CircuitSettings,
        channels: ChannelPool,
        terminus: Terminus | None = None,
        forwards: bool = True,
        directory: PeerDirectory | None = None,
    ) -> None:
        self._onion_keys = onion_keys
        self._directory = directory  # next hops only among its members (None: any address)
        self._settings = settings
        self._channels = channels
        self._terminus = terminus
        self._forwards = forwards
        self.sources = SourceLimits(
            settings.setups_per_source_per_s, settings.setup_burst_per_source, settings.circuits_per_source
        )
        self.active = 0
        self.counters = RelayCounters()

    def report_to(self, metrics: NodeMetrics) -> None:
        counters = self.counters
        metrics.read("swarmserve_relay_open_circuits", "circuits open through this node now", lambda: self.active)
        metrics.read_counter(
            "swarmserve_relay_cells_forwarded",
            "data cells passed on, towards the exit (forward) or back",
            lambda: counters.cells,
            ["direction"],
        )
        metrics.read_counter(
            "swarmserve_relay_forwarded_bytes",
            "payload bytes of the data cells passed on",
            lambda: counters.bytes,
            ["direction"],
        )
        metrics.read_counter(
            "swarmserve_relay_setups_refused",
            "circuit set-ups refused, by reason",
            lambda: counters.refused,
            ["reason"],
        )

    async def Circuit(
        self,
        request_iterator: AsyncIterator[relay_pb2.RelayCell],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[relay_pb2.RelayCell]:
        upstream = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(upstream), self._settings.setup_timeout_s)
        except (StopAsyncIteration, TimeoutError):
            return
        refuse = self.counters.refused
        if first.WhichOneof("cell") != "create":
            refuse["not_a_setup"] += 1
            raise InvalidArgument("the first cell of a circuit must be create")
        if self.active >= self._settings.max_circuits:
            refuse["relay_full"] += 1
            raise ResourceExhausted(f"this relay holds its maximum of {self._settings.max_circuits} circuits")
        peer = context.peer()
        source = source_of(peer)
        try:
            self.sources.admit(
                source, lambda: self._directory is not None and self._directory.member_on_host(host_of(peer))
            )
        except ResourceExhausted:
            refuse["source_limit"] += 1
            raise
        try:
            try:
                opened = self._onion_keys.open(first.create.onion)
            except native.CryptoError:
                refuse["undecryptable"] += 1
                raise
            peeled = opened.peeled
            address = None
            if peeled.is_final:
                if self._terminus is None:
                    refuse["not_an_exit"] += 1
                    raise InvalidArgument("this relay does not terminate circuits")
            else:
                if not self._forwards:
                    refuse["not_a_relay"] += 1
                    raise InvalidArgument("this node terminates circuits and does not forward them")
                address = self._next_hop(peeled)
                if address is None:
                    refuse["next_hop_unknown"] += 1
                    yield destroy_cell(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)
                    return
            try:
                self._onion_keys.accept(opened)
            except (native.ReplayError, native.ReplayCacheFullError):
                refuse["replayed"] += 1
                raise
            self.active += 1
            started = time.monotonic()
            try:
                cells = (
                    self._terminate(peeled.hop, upstream)
                    if address is None
                    else self._forward(peeled, address, upstream)
                )
                async for cell in cells:
                    yield cell
            finally:
                self.active -= 1
                log.info(
                    "circuit closed",
                    role="exit" if peeled.is_final else "relay",
                    seconds=round(time.monotonic() - started, 3),
                )
        finally:
            self.sources.release(source)

    def _next_hop(self, peeled: native.PeeledSetup) -> str | None:
        """The member address a forward set-up names; None for an address that is no member."""
        try:
            address = peeled.routing_info.decode()
            parse_listen_address(address)
        except ValueError:
            raise InvalidArgument("the set-up names no valid next hop") from None
        if self._directory is not None and self._directory.member_at(address) is None:
            # A relay is no open proxy: a set-up naming anything but a known member (an internal
            # service, a victim to flood) is refused as an unreachable hop, and nothing is dialled.
            log.warning("set-up names a next hop that is not a member; refused")
            return None
        return address

    async def _receive(self, call: Any) -> Any:
        """The next cell from the next hop (or STREAM_EOF)."""
        return await call.read()

    async def _terminate(
        self, hop: native.CircuitHop, upstream: AsyncIterator[relay_pb2.RelayCell]
    ) -> AsyncIterator[relay_pb2.RelayCell]:
        assert self._terminus is not None
        yield created_cell(hop.wrap_backward(CIRCUIT_READY))

        async def forward_plaintexts() -> AsyncIterator[bytes]:
            async for cell in upstream:
                kind = cell.WhichOneof("cell")
                if kind == "destroy":
                    return
                if kind != "data":
                    raise InvalidArgument(f"unexpected {kind} cell on an open circuit")
                yield hop.peel_forward(cell.data.payload)

        async for plaintext in self._terminus.handle(forward_plaintexts()):
            yield data_cell(hop.wrap_backward(plaintext))

    async def _forward(
        self, peeled: native.PeeledSetup, address: str, upstream: AsyncIterator[relay_pb2.RelayCell]
    ) -> AsyncIterator[relay_pb2.RelayCell]:
        hop = peeled.hop
        assert peeled.next_cell is not None
        call = open_stream(relay_pb2_grpc.RelayStub(self._channels.get(address)).Circuit)
        try:
            # One deadline for write and read: a next hop that hangs blocks the write too.
            async with asyncio.timeout(self._settings.setup_timeout_s):
                await call.write(create_cell(peeled.next_cell))
                reply = await self._receive(call)
        except aio.AioRpcError as error:
            call.cancel()
            yield destroy_cell(destroy_reason_for(error.code()))
            return
        except TimeoutError:
            call.cancel()
            yield destroy_cell(relay_pb2.DESTROY_REASON_TIMEOUT)
            return
        kind = None if reply is STREAM_EOF else reply.WhichOneof("cell")
        if kind != "created":
            call.cancel()
            yield (reply if kind == "destroy" else destroy_cell(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE))
            return
        yield created_cell(hop.wrap_backward(reply.created.confirmation))

        # Bounded: when the previous hop reads slowly, the backward pump stops reading from the
        # next hop and gRPC's flow control pushes back along the path instead of memory growing.
        outbound: asyncio.Queue[relay_pb2.RelayCell | None] = asyncio.Queue(self._settings.cell_queue)
        last_activity = time.monotonic()

        async def pump_forward() -> None:
            nonlocal last_activity
            try:
                async for cell in upstream:
                    last_activity = time.monotonic()
                    kind = cell.WhichOneof("cell")
                    if kind == "data":
                        try:
                            payload = hop.peel_forward(cell.data.payload)
                        except native.CryptoError:
                            log.warning("tampered forward cell; closing the circuit")
                            await call.write(destroy_cell(relay_pb2.DESTROY_REASON_PROTOCOL_ERROR))
                            await outbound.put(destroy_cell(relay_pb2.DESTROY_REASON_PROTOCOL_ERROR))
                            return
                        await call.write(data_cell(payload))
                        self.counters.forwarded("forward", len(payload))
                    elif kind == "destroy":
                        await call.write(cell)
                        await outbound.put(None)
                        return
                    else:
                        await outbound.put(destroy_cell(relay_pb2.DESTROY_REASON_PROTOCOL_ERROR))
                        return
                await call.done_writing()
            except aio.AioRpcError as error:
                await outbound.put(destroy_cell(destroy_reason_for(error.code())))
            except asyncio.InvalidStateError:  # the next hop's call ended while a cell was on its way
                await outbound.put(destroy_cell(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE))

        async def pump_backward() -> None:
            nonlocal last_activity
            try:
                while (reply := await self._receive(call)) is not STREAM_EOF:
                    last_activity = time.monotonic()
                    kind = reply.WhichOneof("cell")
                    if kind == "data":
                        await outbound.put(data_cell(hop.wrap_backward(reply.data.payload)))
                        self.counters.forwarded("backward", len(reply.data.payload))
                    elif kind == "destroy":
                        await outbound.put(reply)
                        return
                    else:
                        await outbound.put(destroy_cell(relay_pb2.DESTROY_REASON_PROTOCOL_ERROR))
                        return
                await outbound.put(None)
            except aio.AioRpcError as error:
                await outbound.put(destroy_cell(destroy_reason_for(error.code())))

        pumps = [asyncio.create_task(pump_forward()), asyncio.create_task(pump_backward())]
        try:
            while True:
                idle_left = self._settings.idle_timeout_s - (time.monotonic() - last_activity)
                try:
                    cell = await asyncio.wait_for(outbound.get(), max(idle_left, 0.001))
                except TimeoutError:
                    if time.monotonic() - last_activity < self._settings.idle_timeout_s:
                        continue
                    yield destroy_cell(relay_pb2.DESTROY_REASON_TIMEOUT)
                    return
                if cell is None:
                    return
                yield cell
                if cell.WhichOneof("cell") == "destroy":
                    return
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError, asyncio.InvalidStateError):
                    await pump
            call.cancel()
