"""The ``Router`` gRPC servicer: protobuf in and out around :class:`RouterService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from grpc import aio

from services.router.service import RouterService, TokenDelta
from swarmserve.v1 import common_pb2, overlay_pb2, router_pb2, router_pb2_grpc

__all__ = ["RouterServicer"]


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        async with aclosing(self.service.generate(request)) as events:
            async for event in events:
                if not isinstance(event, TokenDelta):
                    yield router_pb2.GenerateResponse(summary=event)
                    continue
                has_token = event.token_id is not None
                yield router_pb2.GenerateResponse(
                    token=router_pb2.TokenChunk(
                        text=event.text,
                        token_ids=[event.token_id] if event.token_id is not None else [],
                        index=event.index,
                        logprobs=[event.logprob] if has_token else [],
                        token_texts=[event.token_bytes] if has_token else [],
                    )
                )

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
