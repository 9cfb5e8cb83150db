"""The inference node's end of an onion circuit: the first forward plaintext is the request
(a ``CircuitMessage``), each generated token goes back as one (padded) ``CircuitMessage`` as
soon as it is taken (the caller takes the next when the circuit can carry it), and any refusal
goes back as a ``CircuitError`` with the status code the client should see. Tokens generated
while the caller could not take them (a backlogged link, a busy event loop) leave together, as
one ``ResponseBatch`` of up to :data:`MAX_BATCHED_RESPONSES`: fewer, fuller cells when the
path is the bottleneck, and no wait when it is not. When
every slot is busy, the request may be passed on to a peer instead (``offload.py``). A multipath
request arrives as shares over several circuits, joined in ``multipath.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from services.inference.multipath import MultipathGroups
from services.inference.offload import Offloader
from services.inference.service import InferenceService
from services.inference.servicer import to_generate_request, to_response
from services.relay.circuit import error_message, pad_message
from services.relay.client import ClientCircuit, decode_message
from swarmserve import native
from swarmserve.rpc import InvalidArgument, ServiceError, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import inference_pb2, relay_pb2

__all__ = ["MAX_BATCHED_RESPONSES", "InferenceExit", "batched_responses"]

# Responses one message carries at most: about 12 KiB of tokens with their checkpoints.
MAX_BATCHED_RESPONSES = 128

log = get_logger("swarmserve.inference")


def _error(error: ServiceError) -> bytes:
    return error_message(error.code, str(error))


# A peer that answers an offloaded request with one of these could not take it after all: the
# request is served here instead. Anything else (a bad request, say) goes back to the client.
_PEER_BUSY = {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0]}


class InferenceExit:
    def __init__(self, service: Callable[[], InferenceService | None], offloader: Offloader | None = None) -> None:
        self._service = service
        self._offloader = offloader
        self.multipath = MultipathGroups()
        self.offloads: Counter[str] = Counter({"sent": 0, "received": 0})  # read by /metrics

    async def handle(self, forward: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        try:
            first = await anext(forward)
        except StopAsyncIteration:
            return
        try:
            message = relay_pb2.CircuitMessage.FromString(first)
        except DecodeError:
            yield _error(InvalidArgument("the circuit's first message is not a CircuitMessage"))
            return
        if message.WhichOneof("body") == "share":  # one path of a multipath request
            async for cell in self.multipath.join(message.share, self._serve):
                yield cell
            return
        async for cell in self._serve(message):
            yield cell

    async def _serve(self, message: relay_pb2.CircuitMessage) -> AsyncIterator[bytes]:
        """The answer to a request message, as padded plaintexts (an error ends it)."""
        if message.WhichOneof("body") != "request":
            yield _error(InvalidArgument("the circuit's first message must be a request"))
            return
        service = self._service()
        if service is None:
            yield _error(Unavailable("the node is still loading its models"))
            return
        if message.request.forwarding.visited:  # a busy peer passed it on
            self.offloads["received"] += 1
        if self._offloader is not None:
            try:
                passed = await self._offload(service, message.request)
            except ServiceError as error:
                yield _error(error)
                return
            if passed is not None:
                self.offloads["sent"] += 1
                async for cell in passed:
                    yield cell
                return
        try:
            async for responses in batched_responses(
                to_response(e) async for e in service.generate(to_generate_request(message.request))
            ):
                if len(responses) == 1:
                    yield pad_message(relay_pb2.CircuitMessage(response=responses[0]))
                else:
                    batch = relay_pb2.ResponseBatch(responses=responses)
                    yield pad_message(relay_pb2.CircuitMessage(responses=batch))
        except ServiceError as error:
            yield _error(error)
        except (ValueError, native.CryptoError) as error:
            yield _error(InvalidArgument(str(error)))

    async def _offload(
        self, service: InferenceService, request: inference_pb2.InferenceGenerateRequest
    ) -> AsyncIterator[bytes] | None:
        """The peer's answer cells if the request was passed on, None to serve it here."""
        assert self._offloader is not None
        peer = self._offloader.target(service, request)
        if peer is None:
            return None
        circuit: ClientCircuit | None = None
        try:
            circuit = await self._offloader.open(peer, request)
            first = await circuit.receive_plaintext()
            reply = decode_message(first)
        except ServiceError as error:
            reason = str(error)
        else:
            if reply.WhichOneof("body") != "error" or reply.error.code not in _PEER_BUSY:
                return self._offloader.relay(circuit, first)
            reason = reply.error.message  # the peer could not take it after all
        if circuit is not None:
            circuit.close()
        log.info("offload failed; serving here", peer=peer.node_id[:16], reason=reason)
        return None


async def batched_responses(
    responses: AsyncIterator[inference_pb2.InferenceGenerateResponse],
) -> AsyncGenerator[list[inference_pb2.InferenceGenerateResponse], None]:
    """``responses`` as they come, in lists of all that were ready when the caller asked for
    the next (at most :data:`MAX_BATCHED_RESPONSES`): one each while the caller keeps up. What
    ``responses`` raises is raised here, after the responses before it."""
    ready: asyncio.Queue[inference_pb2.InferenceGenerateResponse | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for response in responses:
                ready.put_nowait(response)
            ready.put_nowait(None)
        except Exception as error:
            ready.put_nowait(error)

    task = asyncio.create_task(pump())
    try:
        while True:
            # All that is ready, up to the bound; the end (None or an error) comes last.
            items = [await ready.get()]
            while (
                isinstance(items[-1], inference_pb2.InferenceGenerateResponse)
                and len(items) < MAX_BATCHED_RESPONSES
                and not ready.empty()
            ):
                items.append(ready.get_nowait())
            batch = [i for i in items if isinstance(i, inference_pb2.InferenceGenerateResponse)]
            if batch:
                yield batch
            if items[-1] is None:
                return
            if isinstance(items[-1], BaseException):
                raise items[-1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
