"""A relay's configuration (also the circuit settings of an inference node's terminating hop)."""

from __future__ import annotations

from pydantic import Field

from swarmserve.config import NodeConfig, ServerSettings, StrictModel

__all__ = ["CircuitSettings", "RelayConfig"]


class CircuitSettings(StrictModel):
    max_circuits: int = Field(1024, ge=1, description="circuits held at once; beyond: RESOURCE_EXHAUSTED")
    idle_timeout_s: float = Field(300.0, gt=0, description="a circuit with no cell either way this long is closed")
    setup_timeout_s: float = Field(10.0, gt=0, description="how long the next hop may take to confirm a set-up")
    replay_cache_capacity: int = Field(100_000, ge=1)
    replay_ttl_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="how long set-up tags are remembered (at least the onion key's lifetime)",
    )


class RelayConfig(NodeConfig):
    server: ServerSettings = ServerSettings(listen="127.0.0.1:7100")
    advertise: str | None = Field(None, description="address published to peers (default: the listen address)")
    circuits: CircuitSettings = CircuitSettings()
