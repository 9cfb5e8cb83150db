"""A router's configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from services.relay.config import DATA_PLANE_HELP, DataPlane
from swarmserve import native
from swarmserve.config import NodeConfig, ServerSettings, StrictModel

__all__ = ["DEFAULT_ROUTER", "AuditSettings", "CircuitPoolSettings", "DuelSettings", "FailoverSettings", "RouterConfig"]

DEFAULT_ROUTER = "127.0.0.1:7000"
# The inference node terminating a circuit is its last layer; the rest can be relays.
MAX_RELAYS = native.MAX_LAYERS - 1


class DuelSettings(StrictModel):
    """Duel-and-judge (``services/router/duels.py``); needs a ledger (the chain draws the judges,
    rechecks the votes and slashes the loser: its genesis sets how many judges and how much)."""

    rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="share of served requests also sent to a second provider and judged; the judges "
        "see that prompt and both answers (0: never). A duel costs about as much as four requests "
        "(the second answer and three votes; bench/verification.py), so 1% keeps verification "
        "within 10% of serving",
    )
    timeout_s: float = Field(120.0, gt=0, description="how long the second answer and the votes may take")


class AuditSettings(StrictModel):
    """Audits of requests whose clients consent (``PrivacyOptions.allow_audit``;
    ``services/router/audits.py``); needs a ledger (its lottery draws the verifier, and records
    the verdict)."""

    rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="share of the requests whose client consented that a verifier re-executes (0: never); "
        "an audit costs about as much as serving the request again",
    )
    timeout_s: float = Field(120.0, gt=0, description="how long the verifier may take")


class CircuitPoolSettings(StrictModel):
    """Circuits built before the requests that take them (``services/router/circuit_pool.py``):
    one circuit, one request, as always; set-up leaves the path of the first token."""

    enabled: bool = Field(True, description="keep circuits ready for the exits and hop counts asked for lately")
    per_exit: int = Field(2, ge=1, le=64, description="circuits kept ready for one exit and hop count")
    max_circuits: int = Field(
        32, ge=1, le=1024, description="circuits kept ready in all (each holds a place at its relays)"
    )
    building: int = Field(2, ge=1, le=64, description="pooled circuits being built at once")
    max_age_s: float = Field(
        60.0, gt=0, description="a ready circuit older than this is closed unused (below relays' idle timeout)"
    )
    demand_window_s: float = Field(
        60.0, gt=0, description="circuits are kept for the exit and hop count of a request this recent"
    )


class FailoverSettings(StrictModel):
    """What the router does when a node or relay fails under a request (``service.py``): before
    any token reached the client it tries another node, whatever the failure; after some, it
    resumes the stream on another node serving the same weights, from the tokens delivered."""

    start_attempts: int = Field(
        3, ge=1, le=10, description="nodes a request may be sent to before its first token (each through new relays)"
    )
    max_resumptions: int = Field(
        2, ge=0, le=10, description="times one stream may be resumed on another node after tokens were delivered"
    )
    resume_deadline_s: float = Field(
        30.0, gt=0, description="longest time from a failure to the resumed stream's first token"
    )
    probe_timeout_s: float = Field(
        1.0,
        gt=0,
        description="after a failure, how long each hop of the failed path has to answer a health check "
        "before it is left out of the request's next path",
    )


class RouterConfig(NodeConfig):
    server: ServerSettings = ServerSettings(listen=DEFAULT_ROUTER)
    advertise: str | None = Field(None, description="address published to peers (default: the listen address)")
    dispatch: Literal["overlay", "round-robin", "random", "local-only", "central-oracle"] = Field(
        "overlay",
        description="how the serving node is chosen; everything but overlay is a baseline for benchmarks",
    )
    home: str | None = Field(None, description="local-only: address of this entry point's own inference node")
    offload_hops: int = Field(
        2, ge=0, le=8, description="overlay: how many times an overloaded node may pass a request on (0: never)"
    )
    default_hops: int = Field(3, ge=0, le=MAX_RELAYS, description="relays per circuit when a request does not say")
    max_hops: int = Field(MAX_RELAYS, ge=0, le=MAX_RELAYS)
    max_paths: int = Field(
        8,
        ge=1,
        le=native.SIDA_MAX_SHARES,
        description="most circuits one multipath request may use (PrivacyOptions.paths)",
    )
    max_request_bytes: int = Field(
        64 * 1024, ge=1024, description="larger requests are refused before any circuit is built"
    )
    data_plane: DataPlane = Field("link", description=DATA_PLANE_HELP)
    setup_timeout_s: float = Field(10.0, gt=0, description="how long a circuit may take to open")
    cell_timeout_s: float = Field(120.0, gt=0, description="longest wait for the next cell of an answer")
    failover: FailoverSettings = FailoverSettings()
    circuit_pool: CircuitPoolSettings = CircuitPoolSettings()
    duels: DuelSettings = DuelSettings()
    audits: AuditSettings = AuditSettings()
    http_listen: str | None = Field(
        None, description="HOST:PORT for the OpenAI-compatible HTTP API, the dashboard and /metrics (unset: no HTTP)"
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="if any, the HTTP API asks for one of them (Authorization: Bearer KEY); set through the "
        "environment (SWARMSERVE_API_KEYS='[\"KEY\"]'), never in a file under version control",
    )

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if self.default_hops > self.max_hops:
            raise ValueError(f"default_hops ({self.default_hops}) exceeds max_hops ({self.max_hops})")
        if self.dispatch == "local-only" and not self.home:
            raise ValueError("dispatch local-only needs home (this entry point's own inference node)")
        return self
