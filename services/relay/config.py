"""A relay's configuration (also the circuit settings of an inference node's terminating hop)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from swarmserve.config import NodeConfig, ServerSettings, StrictModel
from swarmserve.keys import OnionKeyRing

__all__ = ["DATA_PLANE_HELP", "CircuitSettings", "DataPlane", "RelayConfig"]


DataPlane = Literal["link", "circuit-rpc"]
DATA_PLANE_HELP = (
    "how circuits this node starts travel: 'link' (multiplexed on one Relay.Link stream per "
    "neighbour, every cell handled natively) or 'circuit-rpc' (one Relay.Circuit call per circuit, "
    "cells sealed in Python; kept for comparison). Relays and exits serve both"
)


class CircuitSettings(StrictModel):
    max_circuits: int = Field(1024, ge=1, description="circuits held at once; beyond: RESOURCE_EXHAUSTED")
    idle_timeout_s: float = Field(300.0, gt=0, description="a circuit with no cell either way this long is closed")
    setup_timeout_s: float = Field(10.0, gt=0, description="how long the next hop may take to confirm a set-up")
    cell_queue: int = Field(64, ge=1, description="cells waiting per circuit before the relay stops reading more")
    onion_key_lifetime_s: float = Field(3600.0, gt=0, description="a new onion key (in memory only) this often")
    onion_key_overlap_s: float = Field(
        600.0, ge=0, description="how long the previous onion key is still accepted after a new one is published"
    )
    replay_cache_capacity: int = Field(
        250_000,
        ge=1,
        description="set-up tags remembered per onion key (about 100 bytes each); when full, the key is replaced",
    )
    setups_per_source_per_s: float = Field(
        20.0, gt=0, description="set-ups one source (an IPv4 address or IPv6 /64) may start per second, sustained"
    )
    setup_burst_per_source: int = Field(100, ge=1, description="set-ups one source may start at once")
    circuits_per_source: int = Field(256, ge=1, description="circuits one source may hold open at once")
    data_plane: DataPlane = Field("link", description=DATA_PLANE_HELP + " (this node's offloads)")

    def onion_keys(self) -> OnionKeyRing:
        return OnionKeyRing(self.onion_key_lifetime_s, self.onion_key_overlap_s, self.replay_cache_capacity)


class RelayConfig(NodeConfig):
    server: ServerSettings = ServerSettings(listen="127.0.0.1:7100")
    advertise: str | None = Field(None, description="address published to peers (default: the listen address)")
    circuits: CircuitSettings = CircuitSettings()
