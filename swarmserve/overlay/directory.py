"""A node's view of the swarm: verified descriptors, newest version per node, and whether each
peer answered recently. The router reads its candidates from here; the static peer poller (and,
later, gossip) writes into it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from grpc import aio

from swarmserve.overlay.descriptors import DescriptorError, node_id_of, open_descriptor
from swarmserve.rpc.channels import ChannelPool
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc

__all__ = ["Peer", "PeerDirectory", "StaticPeers"]

log = get_logger("swarmserve.overlay")


@dataclass
class Peer:
    node_id: str
    descriptor: common_pb2.NodeDescriptor
    signed: common_pb2.SignedDescriptor
    last_seen: float  # time.monotonic() of the last successful contact
    alive: bool = True

    def has_role(self, role: common_pb2.NodeRole.ValueType) -> bool:
        return role in self.descriptor.roles

    def serves(self, model: str) -> bool:
        return any(m.name == model for m in self.descriptor.models)


class PeerDirectory:
    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def offer(self, signed: common_pb2.SignedDescriptor) -> Peer | None:
        """Adds or refreshes a peer from a signed descriptor. Descriptors whose signature does
        not verify, and versions older than the one held, are dropped (returns None)."""
        try:
            descriptor = open_descriptor(signed)
        except DescriptorError as error:
            log.warning("descriptor refused", reason=str(error))
            return None
        node_id = node_id_of(descriptor)
        current = self._peers.get(node_id)
        if current is not None and descriptor.version < current.descriptor.version:
            return None
        peer = Peer(node_id, descriptor, signed, time.monotonic())
        self._peers[node_id] = peer
        return peer

    def mark(self, node_id: str, alive: bool) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.alive = alive
            if alive:
                peer.last_seen = time.monotonic()

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def alive(self, role: common_pb2.NodeRole.ValueType) -> list[Peer]:
        return [p for p in self._peers.values() if p.alive and p.has_role(role)]

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)


class StaticPeers:
    """Polls a fixed list of peer addresses with ``Overlay.Exchange`` and feeds what they
    answer into the directory. A peer that does not answer is marked not alive."""

    def __init__(
        self,
        directory: PeerDirectory,
        addresses: Sequence[str],
        channels: ChannelPool,
        interval_s: float = 2.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.directory = directory
        self.addresses = list(addresses)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._by_address: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._channels = channels

    async def refresh(self) -> int:
        """One round over every address; returns how many answered with a valid descriptor."""
        results = await asyncio.gather(*(self._ask(a) for a in self.addresses))
        return sum(results)

    async def _ask(self, address: str) -> bool:
        stub = overlay_pb2_grpc.OverlayStub(self._channels.get(address))
        try:
            reply = await stub.Exchange(overlay_pb2.ExchangeRequest(), timeout=self.timeout_s)
        except aio.AioRpcError:
            if address in self._by_address:
                self.directory.mark(self._by_address[address], alive=False)
            return False
        answered = False
        for signed in reply.updates:
            peer = self.directory.offer(signed)
            if peer is not None and peer.descriptor.address == address:
                self._by_address[address] = peer.node_id
                self.directory.mark(peer.node_id, alive=True)
                answered = True
        return answered

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval_s)
                await self.refresh()

        self._task = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
