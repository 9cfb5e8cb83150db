"""Runs a router: keys, its view of the swarm (gossip membership through one seed), the
``Router`` and ``Overlay`` services, graceful shutdown."""

from __future__ import annotations

from services.router.config import RouterConfig
from services.router.http import create_app
from services.router.service import RouterService
from services.router.servicer import RouterServicer
from swarmserve.http import HttpServer
from swarmserve.keys import NodeKeys
from swarmserve.node import ServiceNode
from swarmserve.overlay import DescriptorPublisher, Membership, overlay_binding
from swarmserve.rpc import ChannelPool, RpcServer, ServiceBinding
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, router_pb2_grpc

__all__ = ["RouterNode"]

log = get_logger("swarmserve.router")


class RouterNode(ServiceNode):
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.keys = NodeKeys.load_or_create(config.data_dir, config.identity_pem())
        self.channels = ChannelPool(config.server.max_message_bytes)
        publisher = DescriptorPublisher(
            self.keys.identity, [common_pb2.NODE_ROLE_ROUTER], lambda: config.advertise or self.server.address
        )
        self.membership = Membership(publisher, self.channels, config.gossip)
        self.directory = self.membership.directory
        ledger = self.open_ledger(config, self.channels, self.keys.identity)
        self.service = RouterService(
            self.keys.identity, self.membership, self.channels, config, self.chain, self.trust, self.metrics
        )
        router = RouterServicer(self.service)
        self.server = RpcServer(
            config.server,
            [
                ServiceBinding(
                    "swarmserve.v1.Router",
                    lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s),
                ),
                overlay_binding(self.membership),
                *ledger,
            ],
        )

        app = create_app(self.service, config, self.metrics)
        self.http = HttpServer(app, config.http_listen) if config.http_listen else None
        self.serve_metrics(config.metrics_listen)

    async def start(self) -> None:
        await self.server.start(serving=False)
        answered = await self.join_swarm()
        if self.http is not None:
            await self.http.start()
        await self.server.mark_serving()
        log.info(
            "router ready",
            address=self.address,
            http=None if self.http is None else self.http.url,
            seeds=len(self.config.gossip.seeds),
            answered=answered,
            members=len(self.directory.members()),
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.service.close()
        await self.channels.close()
