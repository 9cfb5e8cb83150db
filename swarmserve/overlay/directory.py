"""A node's view of the swarm: verified descriptors (newest version per node) and each member's
liveness as this node believes it. Gossip (``membership.py``) writes into it; the router and
offloading inference nodes read their candidates from it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from swarmserve.config import host_of
from swarmserve.overlay.descriptors import DescriptorError, node_id_of, open_descriptor
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, overlay_pb2

__all__ = ["ALIVE", "DEAD", "SUSPECT", "Peer", "PeerDirectory"]

log = get_logger("swarmserve.overlay")

ALIVE = overlay_pb2.MEMBER_STATE_ALIVE
SUSPECT = overlay_pb2.MEMBER_STATE_SUSPECT
DEAD = overlay_pb2.MEMBER_STATE_DEAD


@dataclass
class Peer:
    node_id: str
    descriptor: common_pb2.NodeDescriptor
    signed: common_pb2.SignedDescriptor
    last_seen: float  # time.monotonic() when its newest descriptor arrived
    state: overlay_pb2.MemberState.ValueType = ALIVE
    state_since: float = 0.0  # time.monotonic() of the last state change
    claimed_incarnation: int = 0  # the incarnation a SUSPECT or DEAD claim was about
    leave_signature: bytes = b""  # its own goodbye, if it left (passed on with the news)

    @property
    def alive(self) -> bool:
        return self.state == ALIVE

    def has_role(self, role: common_pb2.NodeRole.ValueType) -> bool:
        return role in self.descriptor.roles

    def serves(self, model: str) -> bool:
        return any(m.name == model for m in self.descriptor.models)

    def onion_key_usable(self, margin_s: float = 30.0) -> bool:
        """Whether a circuit set-up built now with its published onion key will still be
        accepted ``margin_s`` from now (the key rotates; descriptors say until when)."""
        expires_ms = self.descriptor.onion_key_expires_unix_ms
        return len(self.descriptor.onion_key) == 32 and (
            expires_ms == 0 or expires_ms > (time.time() + margin_s) * 1000
        )


class PeerDirectory:
    def __init__(self, own_key: bytes = b"") -> None:
        self._own_key = own_key
        self._peers: dict[str, Peer] = {}

    def offer(
        self, signed: common_pb2.SignedDescriptor, descriptor: common_pb2.NodeDescriptor | None = None
    ) -> Peer | None:
        """Takes a signed descriptor if its version is newer than the one held (returns the
        member, else None). A suspect or dead member becomes alive again only if the descriptor's
        incarnation is above the one the claim was about: only the node itself signs those, so
        only it can refute. Descriptors that do not verify, this node's own, and versions not
        newer than held are dropped, so nobody can overwrite another node's descriptor or roll
        it back. ``descriptor``: ``signed`` already opened (verified) by the caller."""
        if descriptor is None:
            try:
                descriptor = open_descriptor(signed)
            except DescriptorError as error:
                log.warning("descriptor refused", reason=str(error))
                return None
        if descriptor.identity_key == self._own_key:
            return None
        node_id = node_id_of(descriptor)
        current = self._peers.get(node_id)
        now = time.monotonic()
        if current is None:
            log.info("member joined", node_id=node_id[:16], address=descriptor.address)
            peer = Peer(node_id, descriptor, signed, now, ALIVE, now)
            self._peers[node_id] = peer
            return peer
        if descriptor.version <= current.descriptor.version:
            return None
        current.descriptor, current.signed, current.last_seen = descriptor, signed, now
        if current.state != ALIVE and descriptor.incarnation > current.claimed_incarnation:
            log.info("member alive again", node_id=node_id[:16], was=overlay_pb2.MemberState.Name(current.state))
            current.state, current.state_since, current.leave_signature = ALIVE, now, b""
        return current

    def set_state(
        self, node_id: str, state: overlay_pb2.MemberState.ValueType, incarnation: int, leave_signature: bytes = b""
    ) -> Peer | None:
        """Applies a SUSPECT or DEAD claim about ``incarnation`` of a member. Ignored (None) for
        unknown members, for claims about any incarnation but the member's current one (one it
        moved past, or one it never signed), and for claims that change nothing (suspecting a
        member already suspect or dead). Whether a DEAD claim may apply is the caller's to
        decide (only the member's signed leave, or this node's own timer)."""
        peer = self._peers.get(node_id)
        if peer is None or incarnation != peer.descriptor.incarnation:
            return None
        # Dead stays dead (until the member refutes), and a claim already applied is no news.
        if state < peer.state or (state == peer.state and incarnation <= peer.claimed_incarnation):
            return None
        peer.state = state
        peer.state_since = time.monotonic()
        peer.claimed_incarnation = incarnation
        peer.leave_signature = leave_signature if state == DEAD else b""
        log.info("member " + ("suspected" if state == SUSPECT else "declared dead"), node_id=node_id[:16])
        return peer

    def forget(self, node_id: str) -> None:
        self._peers.pop(node_id, None)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def members(self) -> list[Peer]:
        """Everyone not declared dead."""
        return [p for p in self._peers.values() if p.state != DEAD]

    def alive(self, role: common_pb2.NodeRole.ValueType) -> list[Peer]:
        return [p for p in self._peers.values() if p.alive and p.has_role(role)]

    def member_at(self, address: str) -> Peer | None:
        """The member (not declared dead) that publishes ``address``, if any."""
        return next((p for p in self._peers.values() if p.state != DEAD and p.descriptor.address == address), None)

    def member_on_host(self, host: str) -> bool:
        """Whether a member (not declared dead) publishes an address on ``host`` (an IP)."""
        return bool(host) and any(
            p.state != DEAD and host_of(p.descriptor.address) == host for p in self._peers.values()
        )

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)
