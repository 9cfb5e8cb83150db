"""Node configuration: validated pydantic models loaded from one YAML file, with environment
overrides, checked at start-up with errors that name the offending setting.

Every service defines its settings as a subclass of :class:`NodeConfig` and loads them with
:func:`load_config`. Overrides use the ``SWARMSERVE_`` prefix and ``__`` between levels:
``SWARMSERVE_SERVER__LISTEN=0.0.0.0:7000`` sets ``server.listen``. Override values are parsed
as YAML scalars, so numbers, booleans and ``[a, b]`` lists work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "GossipSettings",
    "LogSettings",
    "NodeConfig",
    "ServerSettings",
    "StrictModel",
    "host_of",
    "load_config",
    "parse_listen_address",
]

ENV_PREFIX = "SWARMSERVE_"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names every problem found."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """Splits ``HOST:PORT`` (``[v6]:PORT`` for IPv6) and checks the port range."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return host, port


def host_of(address: str) -> str:
    """The host of ``HOST:PORT`` (or of a bare host), without IPv6 brackets or zone."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]").partition("%")[0]


class StrictModel(BaseModel):
    """Base of every settings section: frozen, and unknown keys are errors."""

    # Unknown keys are mistakes (a typo would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(StrictModel):
    """The gRPC server of a service."""

    listen: str = Field("127.0.0.1:0", description="HOST:PORT to serve on; port 0 picks a free one")
    grace_period_s: float = Field(10.0, ge=0, le=600, description="how long running calls may finish after SIGTERM")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest gRPC message accepted or sent")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen_address(value)
        return value


class LogSettings(StrictModel):
    """Structured logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise"
    )


class GossipSettings(StrictModel):
    """Membership by gossip (SWIM). The defaults follow memberlist's LAN profile, with a shorter
    protocol period because descriptors also carry load that dispatch reads."""

    seeds: list[str] = Field(
        default_factory=list, description="HOST:PORT of any members to join through (one answering is enough)"
    )
    probe_interval_s: float = Field(0.5, gt=0, description="the protocol period: one member probed per period")
    probe_timeout_s: float = Field(0.2, gt=0, description="how long a direct probe waits for its acknowledgement")
    indirect_probes: int = Field(3, ge=0, le=16, description="members asked to probe one that missed a direct probe")
    suspicion_mult: float = Field(
        4.0, gt=0, description="suspicion lasts suspicion_mult x max(1, log10 n) protocol periods before 'dead'"
    )
    suspicion_max_mult: float = Field(
        6.0,
        ge=1,
        description="an unconfirmed suspicion lasts this many times longer; independent confirmations shorten it "
        "(Lifeguard)",
    )
    sender_packets_per_s: float = Field(
        20.0, gt=0, description="gossip messages one sender may send this node per second, sustained"
    )
    sender_burst: int = Field(60, ge=1, description="gossip messages one sender may send at once")
    retransmit_mult: int = Field(
        4, ge=1, description="each piece of news is sent retransmit_mult x ceil(log10(n+1)) times"
    )
    max_piggyback: int = Field(8, ge=1, le=64, description="most pieces of news carried by one packet")
    sync_interval_s: float = Field(10.0, gt=0, description="push-pull exchange of full state with one random member")
    dead_retention_s: float = Field(
        60.0, gt=0, description="dead members are remembered this long (stale news cannot revive them)"
    )
    # Lifeguard's local health (swarmserve/overlay/awareness.py): a node that is itself slow
    # (unanswered probes and helpers, refuting suspicions about itself, a late event loop) waits
    # longer before it suspects others or declares them dead.
    awareness_max_multiplier: int = Field(
        8,
        ge=1,
        le=64,
        description="at worst local health multiplies the probe timeout, the protocol period and the suspicion "
        "timeouts this node applies by this much (memberlist's 8); 1 turns it off",
    )
    awareness_lag_fraction: float = Field(
        0.5,
        gt=0,
        description="the event loop counts as late when a timer, checked every probe_timeout_s, fires more than "
        "this fraction of probe_timeout_s after its time; each late timer raises the health score by its lag in "
        "probe timeouts, rounded up",
    )

    @model_validator(mode="after")
    def _timeouts(self) -> GossipSettings:
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError("probe_timeout_s must be shorter than probe_interval_s (indirect probes need the rest)")
        return self


class LedgerSettings(StrictModel):
    """The credit ledger: with a genesis file, the node keeps a replica of the ledger's chain
    (``data_dir/chain.sqlite3``, its cheques in ``data_dir/payments.sqlite3``; validators also
    keep the consensus node's storage in ``data_dir/consensus``). Without one, the swarm runs no
    ledger and serves for free."""

    genesis: Path | None = Field(
        None, description="the chain's genesis file; a node whose key is in its committee is a validator"
    )
    consensus_listen: str | None = Field(
        None, description="validators: where the consensus node listens (default: its address in the genesis file)"
    )
    chain_sync_interval_s: float = Field(
        1.0, gt=0, description="followers: fetch new blocks from a random member about this often"
    )
    resend_after_s: float | None = Field(
        None,
        gt=0,
        description="a transaction of this node's that the chain has not consumed is sent again this often "
        "(default: every 4 block intervals, at least 0.5 s)",
    )


class NodeConfig(StrictModel):
    """Settings every node has; services extend it with their own sections."""

    data_dir: Path = Field(Path("data"), description="keys and the ledger replica live here")
    identity_key: SecretStr | None = Field(
        None,
        description="this node's identity key as PKCS#8 PEM (e.g. SWARMSERVE_IDENTITY_KEY from a Kubernetes Secret); "
        "kept in data_dir/identity.key, which must hold the same key if it exists (default: that file, made on "
        "first start)",
    )
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    gossip: GossipSettings = GossipSettings()
    ledger: LedgerSettings = LedgerSettings()
    metrics_listen: str | None = Field(
        None, description="HOST:PORT serving Prometheus metrics at /metrics (routers also serve them on http_listen)"
    )

    def identity_pem(self) -> str | None:
        return self.identity_key.get_secret_value() if self.identity_key is not None else None


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = tree.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override {'.'.join(path)}: {key} is not a section")
        tree = child
    tree[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    overrides = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            if isinstance(value, str):
                value = raw  # a string as written: YAML would fold a PEM key's lines into one
            overrides.append((path, value))
    return overrides


def load_config(
    model: type[ConfigT],
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConfigT:
    """Loads ``model`` from the YAML file at ``path`` (defaults only, if None), then applies
    ``SWARMSERVE_*`` overrides from ``environ`` (the process environment by default)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        data = loaded or {}
    for key_path, value in _env_overrides(os.environ if environ is None else environ):
        _set_path(data, key_path, value)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        source = str(path) if path else "defaults"
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid configuration ({source} + {ENV_PREFIX}* overrides): {problems}") from None
