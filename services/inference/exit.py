"""The inference node's end of an onion circuit: the first forward plaintext is the request
(a ``CircuitMessage``), each generated token goes back as one (padded) ``CircuitMessage``, and
any refusal goes back as a ``CircuitError`` with the status code the client should see."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from google.protobuf.message import DecodeError

from services.inference.service import InferenceService
from services.inference.servicer import to_generate_request, to_response
from services.relay.circuit import pad_message
from swarmserve import native
from swarmserve.rpc import InvalidArgument, ServiceError, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import relay_pb2

__all__ = ["InferenceExit"]

log = get_logger("swarmserve.inference")


def _error(error: ServiceError) -> bytes:
    code = int(error.code.value[0])
    return pad_message(relay_pb2.CircuitMessage(error=relay_pb2.CircuitError(code=code, message=str(error))))


class InferenceExit:
    def __init__(self, service: Callable[[], InferenceService | None]) -> None:
        self._service = service

    async def handle(self, forward: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            first = await anext(forward)
        except StopAsyncIteration:
            return
        try:
            message = relay_pb2.CircuitMessage.FromString(first)
        except DecodeError:
            yield _error(InvalidArgument("the circuit's first message is not a CircuitMessage"))
            return
        if message.WhichOneof("body") != "request":
            yield _error(InvalidArgument("the circuit's first message must be a request"))
            return
        service = self._service()
        if service is None:
            yield _error(Unavailable("the node is still loading its models"))
            return
        try:
            async for event in service.generate(to_generate_request(message.request)):
                yield pad_message(relay_pb2.CircuitMessage(response=to_response(event)))
        except ServiceError as error:
            yield _error(error)
        except (ValueError, native.CryptoError) as error:
            yield _error(InvalidArgument(str(error)))
