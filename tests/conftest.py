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

from services.inference.config import ChallengeSettings, InferenceConfig, ModelSettings, ProviderPolicy
from services.inference.models import default_model_path
from services.inference.node import InferenceNode
from services.relay.config import CircuitSettings, RelayConfig
from services.relay.node import RelayNode
from services.relay.servicer import RelayServicer
from services.router.config import DuelSettings, RouterConfig
from services.router.node import RouterNode
from services.verifier.adversaries import requantize_q2k
from swarmserve.config import GossipSettings, ServerSettings
from swarmserve.node import ServiceNode

MODEL = "smollm2-135m-instruct"
# Tests send challenges themselves, when they are about challenges; none in the background.
NO_CHALLENGES = ChallengeSettings(interval_s=0)
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
            "challenges": NO_CHALLENGES,
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
        **router: Any,
    ) -> AsyncIterator[Swarm]:
        """Starts the nodes in turn; the first is the seed everyone else joins through.
        ``inference``: per-node InferenceConfig overrides, one node each (instead of
        ``inference_nodes`` identical ones)."""
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
                    )
                )
                if relay_class is not None:
                    node.relay = relay_class(node.keys.onion, node.config.circuits, node.channels)
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
                    "challenges": NO_CHALLENGES,
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
                    **({"duels": NO_DUELS} | router),
                )
            )
            await router_node.start()
            started.append(router_node)
            await wait_for_members(router_node, relays + len(inference_nodes_started))
            yield Swarm(router_node, relay_nodes, inference_nodes_started)
        finally:
            for node in reversed(started):
                await node.stop(0)

    return start


async def wait_for_members(router: RouterNode, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len([p for p in router.directory.members() if p.alive]) < count:
        assert time.monotonic() < deadline, "gossip did not bring every member to the router"
        await asyncio.sleep(0.05)
