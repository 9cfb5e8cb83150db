"""Shared fixtures: real inference nodes (real llama.cpp, real sockets) on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.inference.config import InferenceConfig, ModelSettings, ProviderPolicy
from services.inference.models import default_model_path
from services.inference.node import InferenceNode
from services.relay.config import CircuitSettings, RelayConfig
from services.relay.node import RelayNode
from services.relay.servicer import RelayServicer
from services.router.config import DuelSettings, RouterConfig
from services.router.node import RouterNode
from services.verifier.adversaries import requantize_q2k
from swarmserve.chain import ChainParameters, Genesis, GenesisAccount, GenesisValidator
from swarmserve.config import GossipSettings, LedgerSettings, ServerSettings
from swarmserve.keys import NodeKeys
from swarmserve.node import ServiceNode
from swarmserve.swarm import free_port_block

MODEL = "smollm2-135m-instruct"
NO_DUELS = DuelSettings(rate=0)
# Gossip at test speed: a 0.2 s protocol period, so failures are noticed in about a second.
FAST_GOSSIP = GossipSettings(probe_interval_s=0.2, probe_timeout_s=0.1, suspicion_mult=3, sync_interval_s=2)


def joining(started: Sequence[ServiceNode], gossip: GossipSettings = FAST_GOSSIP) -> GossipSettings:
    """Gossip settings for a node that joins through the first node started (the first itself
    has no seed), as nodes on separate machines would: nobody is given the member list."""
    return gossip.model_copy(update={"seeds": [started[0].address] if started else []})


@pytest.fixture(scope="session")
def q2k_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A degraded copy of the default model, re-quantized to Q2_K with llama.cpp."""
    return requantize_q2k(default_model_path(), tmp_path_factory.mktemp("models") / "smollm2-q2k.gguf")


NodeFactory = Callable[..., AbstractAsyncContextManager[InferenceNode]]


@pytest.fixture
def inference_node(tmp_path: Path) -> NodeFactory:
    """``async with inference_node(policy=..., models=...) as node`` starts a node on a free
    loopback port and stops it afterwards."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[InferenceNode]:
        settings: dict[str, Any] = {
            "data_dir": tmp_path / "node",
            "server": ServerSettings(listen="127.0.0.1:0", grace_period_s=2),
            "models": [ModelSettings(name=MODEL, context_length=1024)],
            "policy": ProviderPolicy(max_concurrent=1, max_queue=4, max_new_tokens=256, default_new_tokens=16),
        }
        settings.update(overrides)
        node = InferenceNode(InferenceConfig(**settings))
        await node.start()
        try:
            yield node
        finally:
            await node.stop(0)

    return start


@dataclass
class Swarm:
    router: RouterNode
    relays: list[RelayNode]
    inference: list[InferenceNode]
    genesis: Genesis | None = None


# A chain for tests: 10 blocks a second, cheques settle every 2 s, a draw stays valid for 8 s, an
# appeal window is 4 s (a juror re-executes under a full suite's load: 1 s ran out).
TEST_CHAIN = ChainParameters(block_interval_ms=100, leader_timeout_ms=1000, epoch_blocks=20, appeal_blocks=40)
ROUTER_CREDITS = 1000
PROVIDER_CREDITS, PROVIDER_STAKE = 100, 50


def write_genesis(
    directory: Path, relays: int, inference_nodes: int, shared: Sequence[Sequence[str]] = ()
) -> tuple[Path, Genesis]:
    """A genesis for a test swarm whose nodes keep their keys in ``directory/NAME`` (relayN,
    inferenceN, router): the relays and the router validate; every node is its own account
    (the router with ROUTER_CREDITS, inference nodes with PROVIDER_CREDITS and PROVIDER_STAKE
    bonded) except the groups in ``shared``, whose later names are members of the first's."""

    def key(name: str) -> str:
        return NodeKeys.load_or_create(directory / name).identity.public_key.hex()

    names = [*(f"relay{i}" for i in range(relays)), *(f"inference{i}" for i in range(inference_nodes)), "router"]
    members = {m: group[0] for group in shared for m in group[1:]}
    validators = [*names[:relays], "router"]
    base = free_port_block(len(validators))
    genesis = Genesis(
        name=f"test {directory.name}",
        created_unix_ms=1,
        validators=[GenesisValidator(key=key(n), address=f"127.0.0.1:{base + i}") for i, n in enumerate(validators)],
        accounts=[
            GenesisAccount(
                key=key(name),
                credits=ROUTER_CREDITS if name == "router" else PROVIDER_CREDITS if name.startswith("inference") else 0,
                bonded=PROVIDER_STAKE if name.startswith("inference") else 0,
                members=[key(m) for m, owner in members.items() if owner == name],
            )
            for name in names
            if name not in members
        ],
        parameters=TEST_CHAIN,
    )
    path = directory / "genesis.json"
    path.write_bytes(genesis.encode())
    return path, genesis


SwarmFactory = Callable[..., AbstractAsyncContextManager[Swarm]]


@pytest.fixture
def swarm(tmp_path: Path) -> SwarmFactory:
    @asynccontextmanager
    async def start(
        relays: int = 3,
        relay_class: type[RelayServicer] | None = None,
        inference_nodes: int = 1,
        inference: Sequence[dict[str, Any]] = (),
        circuits: CircuitSettings | None = None,
        gossip: GossipSettings = FAST_GOSSIP,
        ledger: bool = False,
        shared: Sequence[Sequence[str]] = (),
        metrics: bool = False,
        **router: Any,
    ) -> AsyncIterator[Swarm]:
        """Starts the nodes in turn; the first is the seed everyone else joins through.
        ``inference``: per-node InferenceConfig overrides, one node each (instead of
        ``inference_nodes`` identical ones). With ``ledger``, the swarm runs the ledger's chain
        (see :func:`write_genesis`; ``shared`` groups nodes into one account). With ``metrics``,
        every node serves ``/metrics`` on a port of its own (``node.metrics_http``)."""
        metrics_listen = "127.0.0.1:0" if metrics else None
        genesis: Genesis | None = None
        chain = LedgerSettings()
        if ledger:
            path, genesis = write_genesis(tmp_path, relays, len(inference) or inference_nodes, shared)
            chain = LedgerSettings(genesis=path, chain_sync_interval_s=0.2)
        relay_nodes = []
        inference_nodes_started: list[InferenceNode] = []
        started: list[Any] = []
        try:
            for i in range(relays):
                node = RelayNode(
                    RelayConfig(
                        data_dir=tmp_path / f"relay{i}",
                        server=ServerSettings(listen="127.0.0.1:0"),
                        circuits=circuits or CircuitSettings(),
                        gossip=joining(started, gossip),
                        ledger=chain,
                        metrics_listen=metrics_listen,
                    )
                )
                if relay_class is not None:
                    node.relay = relay_class(
                        node.onion_keys, node.config.circuits, node.channels, directory=node.membership.directory
                    )
                await node.start()
                started.append(node)
                relay_nodes.append(node)
            for i, overrides in enumerate(inference or [{}] * inference_nodes):
                settings: dict[str, Any] = {
                    "data_dir": tmp_path / f"inference{i}",
                    "server": ServerSettings(listen="127.0.0.1:0"),
                    "models": [ModelSettings(name=MODEL, context_length=1024)],
                    "policy": ProviderPolicy(max_concurrent=1, max_queue=4),
                    "gossip": joining(started, gossip),
                    "ledger": chain,
                    "metrics_listen": metrics_listen,
                }
                inference_node = InferenceNode(InferenceConfig(**(settings | overrides)))
                await inference_node.start()
                started.append(inference_node)
                inference_nodes_started.append(inference_node)
            router_node = RouterNode(
                RouterConfig(
                    data_dir=tmp_path / "router",
                    server=ServerSettings(listen="127.0.0.1:0"),
                    gossip=joining(started, gossip),
                    ledger=chain,
                    metrics_listen=metrics_listen,
                    **({"duels": NO_DUELS} | router),
                )
            )
            await router_node.start()
            started.append(router_node)
            await wait_for_members(router_node, relays + len(inference_nodes_started))
            for relay in relay_nodes:  # relays dial only members they know as next hops
                # Every other member, the router included (counting fewer could count the router
                # in place of an inference node the relay does not know yet).
                await wait_for_members(relay, relays - 1 + len(inference_nodes_started) + 1)
            yield Swarm(router_node, relay_nodes, inference_nodes_started, genesis)
        finally:
            for node in reversed(started):
                await node.stop(0)

    return start


async def wait_for_members(node: RouterNode | RelayNode, count: int, timeout_s: float = 10.0) -> None:
    directory = node.directory if isinstance(node, RouterNode) else node.membership.directory
    deadline = time.monotonic() + timeout_s
    while len([p for p in directory.members() if p.alive]) < count:
        assert time.monotonic() < deadline, "gossip did not bring every member to the node"
        await asyncio.sleep(0.05)
