"""The ``Overlay`` gRPC service: protobuf in and out around :class:`Membership`."""

from __future__ import annotations

from typing import Any

from grpc import aio

from swarmserve.overlay.membership import Membership
from swarmserve.rpc import ServiceBinding
from swarmserve.v1 import overlay_pb2, overlay_pb2_grpc

__all__ = ["OverlayServicer", "overlay_binding"]


class OverlayServicer(overlay_pb2_grpc.OverlayServicer):
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    async def Exchange(
        self, request: overlay_pb2.ExchangeRequest, context: aio.ServicerContext[Any, Any]
    ) -> overlay_pb2.ExchangeResponse:
        return await self.membership.on_exchange(request)

    async def Swim(
        self, request: overlay_pb2.SwimPacket, context: aio.ServicerContext[Any, Any]
    ) -> overlay_pb2.SwimPacket:
        return await self.membership.on_swim(request, context.time_remaining())


def overlay_binding(membership: Membership) -> ServiceBinding:
    overlay = OverlayServicer(membership)
    return ServiceBinding(
        "swarmserve.v1.Overlay", lambda server: overlay_pb2_grpc.add_OverlayServicer_to_server(overlay, server)
    )
