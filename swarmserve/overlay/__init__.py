"""The overlay between nodes: signed node descriptors, the directory a node reads its view of
the swarm from, and the ``Overlay`` service. Until gossip membership lands, the directory is
filled by polling a static peer list; gossip will fill the same directory."""

from swarmserve.overlay.descriptors import (
    DescriptorError,
    node_id_of,
    open_descriptor,
    sign_descriptor,
)
from swarmserve.overlay.directory import Peer, PeerDirectory, StaticPeers
from swarmserve.overlay.publisher import DescriptorPublisher
from swarmserve.overlay.servicer import OverlayServicer, overlay_binding

__all__ = [
    "DescriptorError",
    "DescriptorPublisher",
    "OverlayServicer",
    "Peer",
    "PeerDirectory",
    "StaticPeers",
    "node_id_of",
    "open_descriptor",
    "overlay_binding",
    "sign_descriptor",
]
