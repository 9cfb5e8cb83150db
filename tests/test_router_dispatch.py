"""How the router picks the inference node: the shared overlay policy over signed descriptors
(prefix affinity among acceptable loads, else least loaded; observed latency counts, so a node
cannot capture traffic by claiming to be idle)."""

from __future__ import annotations

import time

import pytest

from services.router.config import RouterConfig
from services.router.service import RouterService, affinity_key
from swarmserve import native
from swarmserve.config import GossipSettings
from swarmserve.overlay import DescriptorPublisher, Membership, PeerDirectory, sign_descriptor
from swarmserve.rpc import ChannelPool, NotFound
from swarmserve.trust import ChainReputation
from swarmserve.v1 import common_pb2, router_pb2

MODEL = "m"
SYSTEM = "You are a careful assistant who answers in one short paragraph. " * 4


def add_node(
    directory: PeerDirectory,
    name: str,
    latency_s: float = 0.1,
    queued: int = 0,
    role: common_pb2.NodeRole.ValueType = common_pb2.NODE_ROLE_INFERENCE,
    key_expires_unix_ms: int = 0,
) -> str:
    identity = native.Identity.generate()
    descriptor = common_pb2.NodeDescriptor(
        identity_key=identity.public_key,
        version=1,
        address=f"127.0.0.1:{abs(hash(name)) % 50000 + 1000}",
        roles=[role],
        onion_key_expires_unix_ms=key_expires_unix_ms,
        onion_key=native.OnionKey.generate().public_key,
        models=[common_pb2.ModelInfo(name=MODEL)],
        capacity=common_pb2.Capacity(max_concurrent=4, max_queue=8),
        load=common_pb2.LoadReport(recent_latency_us=int(latency_s * 1e6), running=1 if queued else 0, queued=queued),
    )
    peer = directory.offer(sign_descriptor(identity, descriptor))
    assert peer is not None
    return peer.node_id


def request(user: str, system: str = SYSTEM) -> router_pb2.GenerateRequest:
    message = router_pb2.GenerateRequest(model=MODEL, sampling=common_pb2.SamplingParams(max_new_tokens=32))
    message.chat.messages.add(role=common_pb2.CHAT_ROLE_SYSTEM, content=system)
    message.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=user)
    return message


def router(directory: PeerDirectory) -> RouterService:
    identity = native.Identity.generate()
    channels = ChannelPool()
    publisher = DescriptorPublisher(identity, [common_pb2.NODE_ROLE_ROUTER], lambda: "127.0.0.1:1")
    membership = Membership(publisher, channels, GossipSettings(), directory)
    return RouterService(identity, membership, channels, RouterConfig(), None, ChainReputation(None))


async def test_requests_sharing_a_prefix_go_where_it_is_cached() -> None:
    directory = PeerDirectory()
    nodes = [add_node(directory, f"n{i}") for i in range(4)]
    service = router(directory)
    first = (await service.choose_exit(request("What is a prime number?"))).node_id
    assert first in nodes
    assert (await service.choose_exit(request("Name a river in Africa."))).node_id == first
    assert affinity_key(request("a"))[:20] == affinity_key(request("b"))[:20]


async def test_busy_nodes_and_lying_slow_nodes_are_avoided() -> None:
    directory = PeerDirectory()
    busy = add_node(directory, "busy", latency_s=0.1, queued=40)
    liar = add_node(directory, "liar", latency_s=8.0, queued=0)  # claims idle, observed slow
    honest = add_node(directory, "honest", latency_s=0.1, queued=1)
    service = router(directory)
    chosen = {
        (await service.choose_exit(request(f"question {i}", system=f"distinct system {i} " * 8))).node_id
        for i in range(5)
    }
    assert busy not in chosen and liar not in chosen and chosen == {honest}


async def test_no_node_for_the_model_is_not_found() -> None:
    with pytest.raises(NotFound, match="no live inference node serves model 'm'"):
        await router(PeerDirectory()).choose_exit(request("hi"))


async def test_what_the_router_observed_outweighs_what_a_node_claims() -> None:
    """A node that claims to be fast and idle, but took 5 s for this router's last request, is
    scored by the 5 s; a node with no history at all counts as typical, not as the fastest."""
    directory = PeerDirectory()
    liar = add_node(directory, "liar", latency_s=0.01)
    honest = add_node(directory, "honest", latency_s=0.5)
    service = router(directory)
    service._finished(liar, started=0.0, latency_s=5.0)
    chosen = {
        (await service.choose_exit(request(f"q {i}", system=f"distinct system {i} " * 8))).node_id for i in range(5)
    }
    assert chosen == {honest}
    # Claiming no latency at all (as a node without history does) counts as typical, not fastest.
    newcomer = add_node(directory, "newcomer", latency_s=0.0)
    picks = {(await service.choose_exit(request(f"n {i}", system=f"other system {i} " * 8))).node_id for i in range(10)}
    assert picks == {honest} and newcomer not in picks


async def test_nodes_whose_onion_key_is_about_to_expire_carry_no_circuit() -> None:
    """Onion keys rotate: a set-up built with a key that expires before it arrives is refused,
    so the router draws neither relays nor exits whose published key expires within 30 s."""
    soon = int((time.time() + 10) * 1000)
    directory = PeerDirectory()
    # The stale exit is the faster one: only its key keeps it out.
    fresh_exit = add_node(directory, "fresh", latency_s=2.0)
    add_node(directory, "stale", latency_s=0.01, key_expires_unix_ms=soon)
    fresh_relay = add_node(directory, "r1", role=common_pb2.NODE_ROLE_RELAY)
    add_node(directory, "r2", role=common_pb2.NODE_ROLE_RELAY, key_expires_unix_ms=soon)
    service = router(directory)
    for _ in range(20):
        exit_ = await service.choose_exit(request("Hello?"))
        assert exit_.node_id == fresh_exit
        assert [r.node_id for r in service.choose_relays(1, exit_)] == [fresh_relay]
