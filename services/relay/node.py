"""Runs a relay: keys, the ``Relay`` and ``Overlay`` services, graceful shutdown."""

from __future__ import annotations

from services.relay.config import RelayConfig
from services.relay.servicer import RelayServicer
from swarmserve.keys import NodeKeys
from swarmserve.node import ServiceNode
from swarmserve.overlay import DescriptorPublisher, Membership, overlay_binding
from swarmserve.rpc import ChannelPool, RpcServer, ServiceBinding
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, relay_pb2_grpc

__all__ = ["RelayNode"]

log = get_logger("swarmserve.relay")


class RelayNode(ServiceNode):
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.keys = NodeKeys.load_or_create(config.data_dir, config.identity_pem())
        self.onion_keys = config.circuits.onion_keys()
        self.channels = ChannelPool(config.server.max_message_bytes)
        self.publisher = DescriptorPublisher(
            self.keys.identity,
            [common_pb2.NODE_ROLE_RELAY],
            lambda: config.advertise or self.server.address,
            onion_keys=self.onion_keys,
        )
        self.membership = Membership(self.publisher, self.channels, config.gossip)
        self.relay = RelayServicer(self.onion_keys, config.circuits, self.channels, directory=self.membership.directory)
        self.server = RpcServer(
            config.server,
            [
                ServiceBinding(
                    "swarmserve.v1.Relay",
                    lambda s: relay_pb2_grpc.add_RelayServicer_to_server(self.relay, s),
                ),
                overlay_binding(self.membership),
                *self.open_ledger(config, self.channels, self.keys.identity),
            ],
        )
        self.relay.report_to(self.metrics)
        self.serve_metrics(config.metrics_listen)

    async def start(self) -> None:
        await self.server.start()
        await self.join_swarm()
        log.info("relay ready", node_id=self.keys.identity.node_id, address=self.address)

    async def close(self) -> None:
        await self.relay.links.close()
        await self.channels.close()
