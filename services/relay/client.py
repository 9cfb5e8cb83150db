"""The client end of an onion circuit (routers, and inference nodes offloading work): builds the
set-up onion through the chosen hops, checks that the path opened, then sends and receives
sealed ``CircuitMessage``s. Two data planes, one interface (:class:`ClientCircuit`):
:class:`OpenCircuit`, one ``Relay.Circuit`` call per circuit with each cell sealed in Python, and
:class:`LinkCircuit`, the circuit multiplexed on the links of a :class:`LinkPlane` with every
per-cell step native. :func:`circuit_opener` picks one by configuration."""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from google.protobuf.message import DecodeError
from grpc import aio

from services.relay.circuit import (
    CIRCUIT_READY,
    create_cell,
    data_cell,
    pad_message,
    status_for_destroy,
)
from services.relay.links import CircuitEnd, EndClosed, LinkPlane
from services.relay.servicer import destroy_reason_for
from swarmserve import native
from swarmserve.overlay import Peer
from swarmserve.rpc import STREAM_EOF, ChannelPool, DataLoss, ServiceError, open_stream
from swarmserve.v1 import relay_pb2, relay_pb2_grpc

__all__ = ["CircuitOpener", "ClientCircuit", "LinkCircuit", "OpenCircuit", "circuit_opener", "decode_message"]


def decode_message(plaintext: bytes) -> relay_pb2.CircuitMessage:
    try:
        return relay_pb2.CircuitMessage.FromString(plaintext)
    except DecodeError:
        raise DataLoss("the terminating node sent a malformed message") from None


def _raise_for_destroy(reason: relay_pb2.DestroyReason.ValueType | int) -> NoReturn:
    code, message = status_for_destroy(relay_pb2.DestroyReason.ValueType(reason))
    raise ServiceError(message, code)


def _hops(relays: Sequence[Peer], exit_: Peer) -> tuple[list[Peer], list[tuple[bytes, bytes]]]:
    """The path, and what each hop's set-up layer holds: its onion key and the address of the
    next hop (the exit is told nothing more)."""
    path = [*relays, exit_]
    return path, [
        (hop.descriptor.onion_key, path[i + 1].descriptor.address.encode() if i + 1 < len(path) else b"")
        for i, hop in enumerate(path)
    ]


class ClientCircuit(abc.ABC):
    """A circuit through ``relays`` to ``exit``; each hop learns only its neighbours. Failures
    raise a ServiceError carrying the status the client should see."""

    @abc.abstractmethod
    async def send(self, message: relay_pb2.CircuitMessage) -> None: ...

    @abc.abstractmethod
    async def receive_plaintext(self) -> bytes:
        """The next message as the terminating node serialized (and padded) it, for a node that
        passes it on unchanged; :meth:`receive` decodes it."""

    async def receive(self) -> relay_pb2.CircuitMessage:
        """The next message from the terminating node."""
        return decode_message(await self.receive_plaintext())

    @abc.abstractmethod
    def is_open(self) -> bool:
        """False once a hop closed the circuit or went away."""

    @abc.abstractmethod
    def close(self) -> None: ...


CircuitOpener = Callable[[Sequence[Peer], Peer, float, float], Awaitable[ClientCircuit]]
"""Opens a circuit: (relays, exit, set-up timeout, cell timeout)."""


def circuit_opener(data_plane: str, channels: ChannelPool, links: LinkPlane) -> CircuitOpener:
    """How this node opens circuits on the configured data plane."""
    if data_plane == "link":
        return functools.partial(LinkCircuit.open, links)
    return functools.partial(OpenCircuit.open, channels)


class OpenCircuit(ClientCircuit):
    """A circuit as one ``Relay.Circuit`` call to its first hop, each cell sealed here."""

    def __init__(self, call: Any, circuit: native.Circuit, cell_timeout_s: float) -> None:
        self._call = call
        self._circuit = circuit
        self._cell_timeout_s = cell_timeout_s

    @classmethod
    async def open(
        cls,
        channels: ChannelPool,
        relays: Sequence[Peer],
        exit_: Peer,
        setup_timeout_s: float,
        cell_timeout_s: float,
    ) -> OpenCircuit:
        path, hops = _hops(relays, exit_)
        onion, circuit = native.Circuit.build(hops)
        call = open_stream(relay_pb2_grpc.RelayStub(channels.get(path[0].descriptor.address)).Circuit)
        opened = cls(call, circuit, cell_timeout_s)
        try:
            # One deadline for the whole set-up: writing to a peer that hangs (its connection
            # open, nothing read) blocks as long as reading from it would.
            async with asyncio.timeout(setup_timeout_s):
                await call.write(create_cell(onion))
                reply = await call.read()
            kind = None if reply is STREAM_EOF else reply.WhichOneof("cell")
            if kind == "destroy":
                _raise_for_destroy(reply.destroy.reason)
            if kind != "created":
                _raise_for_destroy(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)
            try:
                confirmed = circuit.unwrap_backward(reply.created.confirmation) == CIRCUIT_READY
            except native.CryptoError:
                confirmed = False
            if not confirmed:
                raise DataLoss("the circuit's set-up confirmation failed authentication")
        except aio.AioRpcError as error:
            call.cancel()
            _raise_for_destroy(destroy_reason_for(error.code()))
        except TimeoutError:
            call.cancel()
            _raise_for_destroy(relay_pb2.DESTROY_REASON_TIMEOUT)
        except BaseException:
            call.cancel()
            raise
        return opened

    async def send(self, message: relay_pb2.CircuitMessage) -> None:
        try:
            await asyncio.wait_for(
                self._call.write(data_cell(self._circuit.wrap_forward(pad_message(message)))), self._cell_timeout_s
            )
        except aio.AioRpcError as error:
            _raise_for_destroy(destroy_reason_for(error.code()))
        except TimeoutError:
            _raise_for_destroy(relay_pb2.DESTROY_REASON_TIMEOUT)
        except asyncio.InvalidStateError:  # the call ended (a hop closed it) before this cell
            _raise_for_destroy(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)

    async def receive_plaintext(self) -> bytes:
        try:
            reply = await asyncio.wait_for(self._call.read(), self._cell_timeout_s)
        except aio.AioRpcError as error:
            _raise_for_destroy(destroy_reason_for(error.code()))
        except TimeoutError:
            _raise_for_destroy(relay_pb2.DESTROY_REASON_TIMEOUT)
        if reply is STREAM_EOF:
            _raise_for_destroy(relay_pb2.DESTROY_REASON_FINISHED)
        kind = reply.WhichOneof("cell")
        if kind == "destroy":
            _raise_for_destroy(reply.destroy.reason)
        if kind != "data":
            _raise_for_destroy(relay_pb2.DESTROY_REASON_PROTOCOL_ERROR)
        try:
            plaintext: bytes = self._circuit.unwrap_backward(reply.data.payload)
        except native.CryptoError:
            raise DataLoss(
                "a cell on the path failed authentication (tampered or corrupted); the circuit was closed"
            ) from None
        return plaintext

    def is_open(self) -> bool:
        return not self._call.done()

    def close(self) -> None:
        self._call.cancel()


class LinkCircuit(ClientCircuit):
    """A circuit on this node's links (``links.py``): sealing, unsealing and the set-up's
    confirmation are done by the native engine."""

    def __init__(self, end: CircuitEnd, cell_timeout_s: float) -> None:
        self._end = end
        self._cell_timeout_s = cell_timeout_s

    @classmethod
    async def open(
        cls,
        links: LinkPlane,
        relays: Sequence[Peer],
        exit_: Peer,
        setup_timeout_s: float,
        cell_timeout_s: float,
    ) -> LinkCircuit:
        path, hops = _hops(relays, exit_)
        end = links.originate(path[0].descriptor.address, hops)
        try:
            async with asyncio.timeout(setup_timeout_s):
                await end.opened()
        except TimeoutError:
            end.close(relay_pb2.DESTROY_REASON_TIMEOUT)
            _raise_for_destroy(relay_pb2.DESTROY_REASON_TIMEOUT)
        except EndClosed as closed:
            _raise_for_destroy(closed.reason)
        except BaseException:
            end.close()
            raise
        return cls(end, cell_timeout_s)

    async def send(self, message: relay_pb2.CircuitMessage) -> None:
        try:
            self._end.send(pad_message(message))
        except EndClosed as closed:
            _raise_for_destroy(closed.reason)
        except native.CircuitClosedError:
            _raise_for_destroy(relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)

    async def receive_plaintext(self) -> bytes:
        try:
            return await asyncio.wait_for(self._end.receive(), self._cell_timeout_s)
        except TimeoutError:
            self._end.close(relay_pb2.DESTROY_REASON_TIMEOUT)
            _raise_for_destroy(relay_pb2.DESTROY_REASON_TIMEOUT)
        except EndClosed as closed:
            _raise_for_destroy(closed.reason)

    def is_open(self) -> bool:
        return self._end.closed is None

    def close(self) -> None:
        self._end.close()
