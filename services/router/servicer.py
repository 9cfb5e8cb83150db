"""The ``Router`` gRPC servicer: protobuf in and out around :class:`RouterService`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

from grpc import aio

from services.router.service import RouterService, TokenDelta
from swarmserve.v1 import common_pb2, overlay_pb2, router_pb2, router_pb2_grpc

__all__ = ["RouterServicer", "ready_batches", "token_chunk"]

T = TypeVar("T")


_DONE = object()
_READY_AHEAD = 256  # events taken from the stream ahead of a client that reads slowly


async def ready_batches(events: AsyncGenerator[T, None]) -> AsyncIterator[list[T]]:
    """The events of a stream in lists: each list as soon as its first event comes, with every
    event that came while the previous list was being sent. An idle stream's token leaves alone
    and at once; a backlogged one (a slow client, a busy router) shares one message among many,
    so the per-message cost is paid once for them. Errors come after the events before them."""
    queue: asyncio.Queue[Any] = asyncio.Queue(_READY_AHEAD)

    async def produce() -> None:
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    await queue.put(event)
        except Exception as error:  # raised to the caller after the events before it
            await queue.put(error)
        await queue.put(_DONE)

    producer = asyncio.create_task(produce())
    try:
        while True:
            batch: list[T] = []
            item = await queue.get()
            while not (item is _DONE or isinstance(item, Exception)):
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
            if isinstance(item, Exception):
                raise item
            if item is _DONE:
                return
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


def token_chunk(deltas: list[TokenDelta]) -> router_pb2.TokenChunk:
    """One message for consecutive tokens (a chunk's index is its first token's)."""
    tokens = [d for d in deltas if d.token_id is not None]
    return router_pb2.TokenChunk(
        text="".join(d.text for d in deltas),
        token_ids=[d.token_id for d in tokens if d.token_id is not None],
        index=deltas[0].index,
        logprobs=[d.logprob for d in tokens],
        token_texts=[d.token_bytes for d in tokens],
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        async for events in ready_batches(self.service.generate(request)):
            tokens = [e for e in events if isinstance(e, TokenDelta)]
            if tokens:
                yield router_pb2.GenerateResponse(token=token_chunk(tokens))
            for event in events:
                if not isinstance(event, TokenDelta):
                    yield router_pb2.GenerateResponse(summary=event)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> router_pb2.ListModelsResponse:
        offers: dict[tuple[str, bytes], router_pb2.ModelOffer] = {}
        for peer in self.service.directory.alive(common_pb2.NODE_ROLE_INFERENCE):
            for model in peer.descriptor.models:
                key = (model.name, model.weights_digest)
                offer = offers.setdefault(key, router_pb2.ModelOffer(model=model))
                offer.node_count += 1
        return router_pb2.ListModelsResponse(models=sorted(offers.values(), key=lambda o: o.model.name))

    async def GetSwarm(
        self, request: router_pb2.GetSwarmRequest, context: aio.ServicerContext[Any, Any]
    ) -> router_pb2.GetSwarmResponse:
        members = [
            overlay_pb2.MemberView(
                descriptor=peer.signed,
                node_id=peer.node_id,
                state=peer.state,
            )
            for peer in self.service.directory.peers()
            if not request.role or peer.has_role(request.role)
        ]
        return router_pb2.GetSwarmResponse(members=sorted(members, key=lambda m: m.node_id))
