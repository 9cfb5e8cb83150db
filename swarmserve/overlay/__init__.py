"""The overlay between nodes: signed node descriptors, the directory a node reads its view of
the swarm from, membership by gossip (SWIM) that fills it, and the ``Overlay`` service."""

from swarmserve.overlay.descriptors import (
    DescriptorError,
    node_id_of,
    open_descriptor,
    sign_descriptor,
)
from swarmserve.overlay.directory import ALIVE, DEAD, SUSPECT, Peer, PeerDirectory
from swarmserve.overlay.membership import Membership
from swarmserve.overlay.publisher import DescriptorPublisher
from swarmserve.overlay.servicer import OverlayServicer, overlay_binding

__all__ = [
    "ALIVE",
    "DEAD",
    "SUSPECT",
    "DescriptorError",
    "DescriptorPublisher",
    "Membership",
    "OverlayServicer",
    "Peer",
    "PeerDirectory",
    "node_id_of",
    "open_descriptor",
    "overlay_binding",
    "sign_descriptor",
]
