"""The client end of an onion circuit (routers, and inference nodes offloading work): builds the
set-up onion through the chosen hops, checks that the path opened, then sends and receives
sealed ``CircuitMessage``s."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError
from grpc import aio

from services.relay.circuit import (
    CIRCUIT_READY,
    create_cell,
    data_cell,
    pad_message,
    status_for_destroy,
)
from services.relay.servicer import destroy_reason_for
from swarmserve import native
from swarmserve.overlay import Peer
from swarmserve.rpc import STREAM_EOF, ChannelPool, DataLoss, ServiceError, open_stream
from swarmserve.v1 import relay_pb2, relay_pb2_grpc

__all__ = ["OpenCircuit", "decode_message"]


def decode_message(plaintext: bytes) -> relay_pb2.CircuitMessage:
    try:
        return relay_pb2.CircuitMessage.FromString(plaintext)
    except DecodeError:
        raise DataLoss("the terminating node sent a malformed message") from None


def _raise_for_destroy(reason: relay_pb2.DestroyReason.ValueType) -> None:
    code, message = status_for_destroy(reason)
    raise ServiceError(message, code)


class OpenCircuit:
    """A circuit through ``relays`` to ``exit``; each hop learns only its neighbours."""

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
        path = [*relays, exit_]
        # Each hop is told the address of the next; the exit is told nothing more.
        hops = [
            (
                hop.descriptor.onion_key,
                path[i + 1].descriptor.address.encode() if i + 1 < len(path) else b"",
            )
            for i, hop in enumerate(path)
        ]
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

    async def receive(self) -> relay_pb2.CircuitMessage:
        """The next message from the terminating node; raises a ServiceError carrying the
        status the client should see when the circuit fails."""
        return decode_message(await self.receive_plaintext())

    async def receive_plaintext(self) -> bytes:
        """The next message as the terminating node serialized (and padded) it, for a node that
        passes it on unchanged; :meth:`receive` decodes it."""
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
        """False once the call ended: a hop closed the circuit or went away."""
        return not self._call.done()

    def close(self) -> None:
        self._call.cancel()
