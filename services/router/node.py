"""Runs a router: keys, its view of the swarm (static peers for now), the ``Router`` and
``Overlay`` services, graceful shutdown."""

from __future__ import annotations

from services.router.config import RouterConfig
from services.router.service import RouterService
from services.router.servicer import RouterServicer
from swarmserve.keys import NodeKeys
from swarmserve.overlay import DescriptorPublisher, OverlayServicer, PeerDirectory, StaticPeers, overlay_binding
from swarmserve.rpc import ChannelPool, RpcServer, ServiceBinding
from swarmserve.rpc.node import ServiceNode
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, router_pb2_grpc

__all__ = ["RouterNode"]

log = get_logger("swarmserve.router")


class RouterNode(ServiceNode):
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.keys = NodeKeys.load_or_create(config.data_dir)
        self.directory = PeerDirectory()
        self.channels = ChannelPool(config.server.max_message_bytes)
        self.peers = StaticPeers(self.directory, config.peers, self.channels, config.refresh_interval_s)
        self.service = RouterService(self.keys.identity, self.directory, self.channels, config)
        publisher = DescriptorPublisher(self.keys.identity, [common_pb2.NODE_ROLE_ROUTER], lambda: self.server.address)
        overlay = OverlayServicer(publisher.describe, self.directory)
        router = RouterServicer(self.service)
        self.server = RpcServer(
            config.server,
            [
                ServiceBinding(
                    "swarmserve.v1.Router",
                    lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s),
                ),
                overlay_binding(overlay),
            ],
        )

    async def start(self) -> None:
        await self.server.start(serving=False)
        answered = await self.peers.refresh()
        self.peers.start()
        await self.server.mark_serving()
        log.info("router ready", address=self.address, peers=len(self.config.peers), answered=answered)

    async def close(self) -> None:
        await self.peers.close()
        await self.channels.close()
