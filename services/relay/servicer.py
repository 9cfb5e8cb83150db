"""The ``Relay`` gRPC service: circuits, either one bidirectional stream each (``Circuit``) or
multiplexed over one stream per neighbour (``Link``, cells handled in ``links.py``'s native
engine). Both admit set-ups by the same rules (:meth:`RelayServicer.admit`).

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
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc import aio

from services.relay.circuit import CIRCUIT_READY, create_cell, created_cell, data_cell, destroy_cell
from services.relay.config import CircuitSettings
from services.relay.limits import SourceLimits, host_of, source_of
from services.relay.links import CircuitEnd, EndClosed, LinkPlane
from swarmserve import native
from swarmserve.config import parse_listen_address
from swarmserve.keys import OnionKeyRing
from swarmserve.overlay import PeerDirectory
from swarmserve.rpc import (
    STREAM_EOF,
    ChannelPool,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    open_stream,
    status_for,
)
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics
from swarmserve.v1 import relay_pb2, relay_pb2_grpc

__all__ = ["Admission", "RelayServicer", "Terminus", "destroy_reason_for"]

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

    def handle(self, forward: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]: ...


@dataclass
class RelayCounters:
    """What this relay forwarded and refused, since it started (read by ``/metrics``)."""

    cells: Counter[str] = field(default_factory=lambda: Counter({"forward": 0, "backward": 0}))
    bytes: Counter[str] = field(default_factory=lambda: Counter({"forward": 0, "backward": 0}))
    refused: Counter[str] = field(default_factory=Counter)  # set-ups, by reason

    def forwarded(self, direction: str, size: int) -> None:
        self.cells[direction] += 1
        self.bytes[direction] += size


class NextHopUnknown(Unavailable):
    """A set-up names a next hop that is no member: refused as an unreachable hop."""


@dataclass
class Admission:
    """An admitted set-up: this hop's keys, and where the rest goes (None: it ends here)."""

    hop: native.CircuitHop
    next_hop: tuple[str, bytes] | None  # (member address, the rest of the onion)
    source: str


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
        links: LinkPlane | None = None,
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
        # Circuits that arrive on links (Relay.Link) are admitted by the same rules as Circuit's.
        self.links = links or LinkPlane(channels, idle_timeout_s=settings.idle_timeout_s)
        self.links.on_setup, self.links.on_release = self._link_setup, self._link_release
        self._link_admissions: dict[tuple[int, int], Admission] = {}

    def _forwarded(self) -> tuple[Counter[str], Counter[str]]:
        """Cells and bytes passed on, by direction, on both data planes."""
        cells, size = self.counters.cells, self.counters.bytes
        forward_cells, backward_cells, forward_bytes, backward_bytes = self.links.engine.forwarded
        return (
            Counter({"forward": cells["forward"] + forward_cells, "backward": cells["backward"] + backward_cells}),
            Counter({"forward": size["forward"] + forward_bytes, "backward": size["backward"] + backward_bytes}),
        )

    def report_to(self, metrics: NodeMetrics) -> None:
        counters = self.counters
        metrics.read("swarmserve_relay_open_circuits", "circuits open through this node now", lambda: self.active)
        metrics.read_counter(
            "swarmserve_relay_cells_forwarded",
            "data cells passed on, towards the exit (forward) or back",
            lambda: self._forwarded()[0],
            ["direction"],
        )
        metrics.read_counter(
            "swarmserve_relay_forwarded_bytes",
            "payload bytes of the data cells passed on",
            lambda: self._forwarded()[1],
            ["direction"],
        )
        metrics.read(
            "swarmserve_relay_links", "links (Relay.Link streams) open to neighbours now", lambda: self.links.links
        )
        metrics.read_counter(
            "swarmserve_relay_link_frames",
            "link frames (batches of cells) sent and received",
            lambda: Counter(self.links.frames),
            ["direction"],
        )
        metrics.read_counter(
            "swarmserve_relay_setups_refused",
            "circuit set-ups refused, by reason",
            lambda: counters.refused,
            ["reason"],
        )

    def admit(self, peer: str, onion: bytes) -> Admission:
        """Decides a set-up from ``peer``, in the order above; raises the refusal (counted).
        On success the source's allowance holds one more circuit until :meth:`release`."""
        refuse = self.counters.refused
        if self.active >= self._settings.max_circuits:
            refuse["relay_full"] += 1
            raise ResourceExhausted(f"this relay holds its maximum of {self._settings.max_circuits} circuits")
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
                opened = self._onion_keys.open(onion)
            except native.CryptoError:
                refuse["undecryptable"] += 1
                raise
            peeled = opened.peeled
            next_hop = None
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
                    raise NextHopUnknown("the set-up names a next hop that is not a member")
                assert peeled.next_cell is not None
                next_hop = (address, peeled.next_cell)
            try:
                self._onion_keys.accept(opened)
            except (native.ReplayError, native.ReplayCacheFullError):
                refuse["replayed"] += 1
                raise
        except BaseException:
            self.sources.release(source)
            raise
        self.active += 1
        return Admission(peeled.hop, next_hop, source)

    def release(self, admission: Admission) -> None:
        self.active -= 1
        self.sources.release(admission.source)

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
        if first.WhichOneof("cell") != "create":
            self.counters.refused["not_a_setup"] += 1
            raise InvalidArgument("the first cell of a circuit must be create")
        try:
            admission = self.admit(context.peer(), first.create.onion)
        except NextHopUnknown:
            yield destroy_cell(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)
            return
        started = time.monotonic()
        try:
            cells = (
                self._terminate(admission.hop, upstream)
                if admission.next_hop is None
                else self._forward(admission.hop, *admission.next_hop, upstream)
            )
            async for cell in cells:
                yield cell
        finally:
            self.release(admission)
            log.info(
                "circuit closed",
                role="exit" if admission.next_hop is None else "relay",
                seconds=round(time.monotonic() - started, 3),
            )

    async def Link(
        self,
        request_iterator: AsyncIterator[relay_pb2.LinkFrame],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[relay_pb2.LinkFrame]:
        async for frame in self.links.serve(request_iterator, context.peer()):
            yield frame

    def _link_setup(self, link: int, circuit: int, onion: bytes) -> None:
        """A set-up that arrived on a link: the same admission as :meth:`Circuit`'s."""
        try:
            admission = self.admit(self.links.peer_of(link), onion)
        except Exception as error:
            mapped = status_for(error)
            if mapped is None:
                raise
            self.links.refuse(link, circuit, destroy_reason_for(mapped[0]))
            return
        self._link_admissions[(link, circuit)] = admission
        try:
            if admission.next_hop is not None:
                self.links.extend(link, circuit, admission.hop, *admission.next_hop)
                return
            end = self.links.terminate(link, circuit, admission.hop)
        except ValueError:  # withdrawn (a DESTROY in the same frame) before it was decided
            self._link_release(link, circuit)
            return
        end.task = asyncio.create_task(self._serve_end(end))

    def _link_release(self, link: int, circuit: int) -> None:
        admission = self._link_admissions.pop((link, circuit), None)
        if admission is not None:
            self.release(admission)

    async def _serve_end(self, end: CircuitEnd) -> None:
        """The terminus's answer to a circuit that ends here on a link."""
        assert self._terminus is not None

        async def forward_plaintexts() -> AsyncIterator[bytes]:
            while True:
                try:
                    yield await end.receive()
                except EndClosed:
                    return

        try:
            async with contextlib.aclosing(self._terminus.handle(forward_plaintexts())) as answer:
                async for plaintext in answer:
                    end.send(plaintext)
                    # The next answer is taken once the link has written what it had: while it is
                    # backlogged, the tokens made meanwhile leave together (services/inference/exit.py).
                    await end.writable()
            end.close()
        except EndClosed:
            pass
        except Exception:  # the Circuit path's interceptor would log it and end the call
            log.exception("the terminus failed; closing its circuit")
            end.close(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)

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
        self, hop: native.CircuitHop, address: str, next_cell: bytes, upstream: AsyncIterator[relay_pb2.RelayCell]
    ) -> AsyncIterator[relay_pb2.RelayCell]:
        call = open_stream(relay_pb2_grpc.RelayStub(self._channels.get(address)).Circuit)
        try:
            # One deadline for write and read: a next hop that hangs blocks the write too.
            async with asyncio.timeout(self._settings.setup_timeout_s):
                await call.write(create_cell(next_cell))
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
