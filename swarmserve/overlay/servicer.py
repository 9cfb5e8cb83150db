"""The ``Overlay`` gRPC service. ``Exchange`` answers with this node's own signed descriptor
(fresh: load figures change) and the descriptors it holds; membership probing (``Swim``) and
work forwarding (``Forward``) arrive with gossip membership and overlay dispatch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc import aio

from swarmserve.overlay.directory import PeerDirectory
from swarmserve.rpc import ServiceBinding, Unimplemented
from swarmserve.v1 import common_pb2, inference_pb2, overlay_pb2, overlay_pb2_grpc

__all__ = ["OverlayServicer", "overlay_binding"]


class OverlayServicer(overlay_pb2_grpc.OverlayServicer):
    def __init__(
        self,
        describe: Callable[[], common_pb2.SignedDescriptor],
        directory: PeerDirectory | None = None,
    ) -> None:
        self._describe = describe
        self._directory = directory

    async def Exchange(
        self, request: overlay_pb2.ExchangeRequest, context: aio.ServicerContext[Any, Any]
    ) -> overlay_pb2.ExchangeResponse:
        own = self._describe()
        updates = [own]
        if self._directory is not None:
            for signed in [request.sender, *request.updates]:
                if signed.descriptor:
                    self._directory.offer(signed)
            known = {(d.identity_key, d.version) for d in request.known}
            updates += [
                p.signed
                for p in self._directory.peers()
                if (p.descriptor.identity_key, p.descriptor.version) not in known
            ]
        return overlay_pb2.ExchangeResponse(updates=updates)

    async def Swim(
        self, request: overlay_pb2.SwimPacket, context: aio.ServicerContext[Any, Any]
    ) -> overlay_pb2.SwimPacket:
        raise Unimplemented("membership probing arrives with gossip membership")

    async def Forward(
        self,
        request: inference_pb2.InferenceGenerateRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.InferenceGenerateResponse]:
        raise Unimplemented("overlay forwarding arrives with overlay dispatch")
        yield  # pragma: no cover - makes this an async generator, as the stream needs


def overlay_binding(overlay: OverlayServicer) -> ServiceBinding:
    return ServiceBinding(
        "swarmserve.v1.Overlay", lambda server: overlay_pb2_grpc.add_OverlayServicer_to_server(overlay, server)
    )
