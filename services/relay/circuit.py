"""What the relay, the router and the terminating node share about circuits: cell builders,
the set-up confirmation, padding of the inner messages, and what a teardown reason means."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from swarmserve import native
from swarmserve.v1 import inference_pb2, relay_pb2

__all__ = [
    "CIRCUIT_READY",
    "create_cell",
    "created_cell",
    "data_cell",
    "destroy_cell",
    "error_message",
    "pad_message",
    "responses_in",
    "status_for_destroy",
]

# What the terminating node seals (one backward layer per hop) in its CircuitCreated: the
# router opening it proves every hop on the path holds the keys it was given. One definition,
# native/src/link.rs, shared with the link engine.
CIRCUIT_READY = native.CIRCUIT_READY

_MIN_BUCKET = 64
_LARGE_STEP = 16 * 1024


def create_cell(onion: bytes) -> relay_pb2.RelayCell:
    return relay_pb2.RelayCell(create=relay_pb2.CreateCircuit(onion=onion))


def created_cell(confirmation: bytes) -> relay_pb2.RelayCell:
    return relay_pb2.RelayCell(created=relay_pb2.CircuitCreated(confirmation=confirmation))


def data_cell(payload: bytes) -> relay_pb2.RelayCell:
    return relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=payload))


def destroy_cell(reason: relay_pb2.DestroyReason.ValueType) -> relay_pb2.RelayCell:
    return relay_pb2.RelayCell(destroy=relay_pb2.DestroyCircuit(reason=reason))


def _bucket(size: int) -> int:
    if size > _LARGE_STEP:
        return -(-size // _LARGE_STEP) * _LARGE_STEP
    bucket = _MIN_BUCKET
    while bucket < size:
        bucket *= 2
    return bucket


def pad_message(message: relay_pb2.CircuitMessage) -> bytes:
    """Serializes ``message`` padded to a size bucket (64, 128, ... bytes), so cell lengths say
    less about what they carry (a token's length, for instance). Sets the padding field of
    ``message`` (callers pass a message built for the cell). Runs once per token: the
    padding size is computed, and the message is serialized once."""
    size = message.ByteSize()
    target = _bucket(size + 3)
    # The padding field costs a one-byte tag and its length as a varint, then the fill. Where
    # that varint grows by a byte no fill lands exactly, and the cell is one byte short.
    fill = target - size - 1
    while fill > 0 and 1 + _varint_size(fill) + fill > target - size:
        fill -= 1
    message.padding = bytes(fill)
    return message.SerializeToString()


def responses_in(message: relay_pb2.CircuitMessage) -> Sequence[inference_pb2.InferenceGenerateResponse] | None:
    """The streamed responses a terminating node's message carries, in order (one, or several
    it batched); None for any other message (an error, say). A batch of fewer than two is not
    one the node would send, and counts as another message."""
    body = message.WhichOneof("body")
    if body == "response":
        return (message.response,)
    if body == "responses" and len(message.responses.responses) > 1:
        return message.responses.responses
    return None


def error_message(code: grpc.StatusCode, message: str) -> bytes:
    """A padded ``CircuitError``: how a terminating node tells the client it refused or failed,
    with the status code the client should see."""
    return pad_message(relay_pb2.CircuitMessage(error=relay_pb2.CircuitError(code=int(code.value[0]), message=message)))


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


_DESTROY_STATUS = {
    relay_pb2.DESTROY_REASON_FINISHED: (
        grpc.StatusCode.UNAVAILABLE,
        "the circuit closed before the answer ended",
    ),
    relay_pb2.DESTROY_REASON_PROTOCOL_ERROR: (
        grpc.StatusCode.DATA_LOSS,
        "a cell on the path failed authentication (tampered or corrupted); the circuit was closed",
    ),
    relay_pb2.DESTROY_REASON_HOP_UNREACHABLE: (
        grpc.StatusCode.UNAVAILABLE,
        "a hop on the path failed or went away",
    ),
    relay_pb2.DESTROY_REASON_TIMEOUT: (
        grpc.StatusCode.UNAVAILABLE,
        "the circuit timed out on the path",
    ),
    relay_pb2.DESTROY_REASON_RESOURCE_LIMIT: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "a relay on the path is at its circuit limit",
    ),
    relay_pb2.DESTROY_REASON_REPLAY: (
        grpc.StatusCode.ALREADY_EXISTS,
        "a relay refused the set-up as a replay",
    ),
    relay_pb2.DESTROY_REASON_SHUTDOWN: (
        grpc.StatusCode.UNAVAILABLE,
        "a hop on the path is shutting down",
    ),
}


def status_for_destroy(reason: relay_pb2.DestroyReason.ValueType) -> tuple[grpc.StatusCode, str]:
    return _DESTROY_STATUS.get(reason, (grpc.StatusCode.UNAVAILABLE, "the circuit was torn down"))
