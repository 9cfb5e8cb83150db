"""Gossip membership (SWIM) between real nodes over real gRPC sockets: joining through one seed,
failure detection with suspicion, refutation of false claims, leaving, bounded traffic, and what
is tried against it (forged, unsigned, replayed and stale descriptors, false death claims,
malformed packets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.relay.config import RelayConfig
from services.relay.node import RelayNode
from swarmserve import native
from swarmserve.config import GossipSettings, ServerSettings
from swarmserve.overlay import ALIVE, DEAD, SUSPECT, DescriptorPublisher, PeerDirectory, sign_descriptor
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from tests.conftest import FAST_GOSSIP, joining

Nodes = Callable[..., AbstractAsyncContextManager[list[RelayNode]]]


@pytest.fixture
def nodes(tmp_path: Path) -> Nodes:
    @asynccontextmanager
    async def start(count: int, gossip: GossipSettings = FAST_GOSSIP) -> AsyncIterator[list[RelayNode]]:
        """``count`` relays; every one after the first knows only the first (its seed)."""
        started: list[RelayNode] = []
        try:
            for i in range(count):
                node = RelayNode(
                    RelayConfig(
                        data_dir=tmp_path / f"n{i}",
                        server=ServerSettings(listen="127.0.0.1:0"),
                        gossip=joining(started, gossip),
                    )
                )
                await node.start()
                started.append(node)
            yield started
        finally:
            for node in started:
                await node.stop(0)

    return start


class Stranger:
    """A member as a hostile one acts: its own identity, signing what it sends (it must, to be
    heard at all), at an address where nothing answers."""

    def __init__(self, address: str = "127.0.0.1:9") -> None:
        self.identity = native.Identity.generate()
        self.publisher = DescriptorPublisher(self.identity, [common_pb2.NODE_ROLE_RELAY], lambda: address)

    def packet(self, **fields: Any) -> overlay_pb2.SwimPacket:
        return self.publisher.sign(overlay_pb2.SwimPacket(sender=self.publisher.describe(), **fields))

    def exchange(self, **fields: Any) -> overlay_pb2.ExchangeRequest:
        return self.publisher.sign(overlay_pb2.ExchangeRequest(sender=self.publisher.describe(), **fields))

    def claim(self, key: bytes, state: int, incarnation: int) -> overlay_pb2.MemberUpdate:
        return self.publisher.claim(key, state, incarnation)  # type: ignore[arg-type]


def state_of(observer: RelayNode, node: RelayNode) -> int | None:
    peer = observer.membership.directory.get(node.keys.identity.node_id)
    return None if peer is None else peer.state


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s:.1f} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def everyone_knows_everyone(group: list[RelayNode]) -> bool:
    return all(state_of(a, b) == ALIVE for a in group for b in group if a is not b)


async def test_nodes_that_know_one_seed_learn_the_whole_swarm(nodes: Nodes) -> None:
    async with nodes(6) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        # Descriptors stay fresh: every node's view of another is at most a few periods old.
        await asyncio.sleep(10 * FAST_GOSSIP.probe_interval_s)
        now = time.monotonic()
        ages = [now - p.last_seen for n in group for p in n.membership.directory.members()]
        assert max(ages) < 10 * FAST_GOSSIP.probe_interval_s


async def test_a_silent_failure_is_suspected_then_declared_dead_within_the_bound(nodes: Nodes) -> None:
    async with nodes(5) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        victim, observers = group[-1], group[:-1]
        await victim.membership.close(leave=False)  # dies: no goodbye
        await victim.server.stop(0)
        # Suspected first: some observer holds it SUSPECT (not straight DEAD) before anyone may
        # declare it dead.
        await until(lambda: any(state_of(o, victim) == SUSPECT for o in observers), 5.0, "suspicion")
        # Bound (swarmserve/overlay/membership.py): probed within n periods, suspected by the end
        # of that period, dead after the suspicion timeout, then O(log n) periods of gossip.
        n = len(group)
        bound = (n + 1) * FAST_GOSSIP.probe_interval_s + observers[0].membership.suspicion_timeout_s() + 1.0
        await until(lambda: all(state_of(o, victim) == DEAD for o in observers), bound, "death everywhere")
        # The survivors keep each other alive.
        assert everyone_knows_everyone(observers)


async def test_a_false_death_claim_is_refuted_by_the_living_node(nodes: Nodes) -> None:
    async with nodes(4) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        victim, liar_target = group[1], group[2]
        claimed = liar_target.membership.directory.get(victim.keys.identity.node_id)
        assert claimed is not None
        # A malicious member tells node 2 that node 1 is dead (its own claim, not the victim's
        # leave: it counts as a suspicion only; tests/adversarial/test_membership.py tries the rest).
        liar = Stranger()
        lie = liar.packet(
            updates=[
                liar.claim(
                    victim.keys.identity.public_key, overlay_pb2.MEMBER_STATE_DEAD, claimed.descriptor.incarnation
                )
            ]
        )
        async with aio.insecure_channel(liar_target.address) as channel:
            await overlay_pb2_grpc.OverlayStub(channel).Swim(lie)
        assert state_of(liar_target, victim) == SUSPECT
        # The news spreads, reaches the victim, and its newer signed descriptor wins everywhere.
        await until(lambda: everyone_knows_everyone(group), 5.0, "refutation")


async def test_forged_stale_and_malformed_gossip_is_dropped(nodes: Nodes) -> None:
    async with nodes(3) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        target, victim = group[0], group[1]
        held = target.membership.directory.get(victim.keys.identity.node_id)
        assert held is not None
        attacker = native.Identity.generate()

        def victims_descriptor(**changes: object) -> common_pb2.NodeDescriptor:
            descriptor = common_pb2.NodeDescriptor()
            descriptor.CopyFrom(held.descriptor)
            for field, value in changes.items():
                setattr(descriptor, field, value)
            return descriptor

        hijack = victims_descriptor(version=held.descriptor.version + 10**9, address="10.6.6.6:1")
        body = hijack.SerializeToString()
        attempts = {
            # Another key signs a descriptor naming the victim's identity key: not its signature.
            "forged": common_pb2.SignedDescriptor(descriptor=body, signature=attacker.sign(body)),
            "unsigned": common_pb2.SignedDescriptor(descriptor=body),
            "not a descriptor": common_pb2.SignedDescriptor(descriptor=b"\xff\x00junk", signature=bytes(64)),
            # The victim's own, genuinely signed, but older descriptor (a replay): no rollback.
            "replayed": common_pb2.SignedDescriptor(descriptor=held.signed.descriptor, signature=held.signed.signature),
        }
        stranger = Stranger()
        async with aio.insecure_channel(target.address) as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            for signed in attempts.values():
                # As the sender of a message: the whole message is refused.
                for message in (overlay_pb2.SwimPacket(sender=signed), overlay_pb2.ExchangeRequest(sender=signed)):
                    call = stub.Swim if isinstance(message, overlay_pb2.SwimPacket) else stub.Exchange
                    with pytest.raises(aio.AioRpcError) as refused:
                        await call(message)  # type: ignore[operator]
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # As news inside a message from a member that signs it: that piece is dropped.
                news = overlay_pb2.MemberUpdate(
                    identity_key=victim.keys.identity.public_key, state=ALIVE, descriptor=signed
                )
                await stub.Swim(stranger.packet(updates=[news]))
                await stub.Exchange(stranger.exchange(updates=[signed]))
            # Claims about keys of the wrong length, about unknown members, unsigned claims, and
            # probe targets that are not keys: answered, ignored.
            answer = await stub.Swim(
                stranger.packet(
                    probe_target=b"short",
                    updates=[
                        stranger.claim(b"x", DEAD, 1),
                        stranger.claim(attacker.public_key, DEAD, 1),
                        overlay_pb2.MemberUpdate(
                            identity_key=victim.keys.identity.public_key,
                            state=DEAD,
                            incarnation=held.descriptor.incarnation,
                        ),
                    ],
                )
            )
            assert not answer.probe_acked and answer.sender.descriptor
        now = target.membership.directory.get(victim.keys.identity.node_id)
        assert now is not None and now.descriptor.address == victim.address and now.state == ALIVE
        assert target.membership.directory.get(attacker.node_id) is None
        # A node may publish only its own descriptor.
        with pytest.raises(ValueError, match="only its own"):
            sign_descriptor(attacker, hijack)


async def test_a_leaving_node_is_dead_at_once_and_a_returning_one_alive_again(nodes: Nodes, tmp_path: Path) -> None:
    async with nodes(4) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        leaving = group[-1]
        await leaving.membership.close(leave=True)
        # Told directly (no suspicion timeout): well under the silent-failure bound.
        await until(lambda: all(state_of(o, leaving) == DEAD for o in group[:-1]), 2.0, "leave")
        leaving.membership.start()  # comes back: its next packets carry a newer descriptor
        await until(lambda: everyone_knows_everyone(group), 5.0, "return")


async def test_a_restarted_seed_that_knows_nobody_rejoins(nodes: Nodes, tmp_path: Path) -> None:
    """The seed dies without a word and comes back at its address knowing nobody (it has no seed
    of its own): the others' gossip to the dead reaches it within a sync interval, and everyone
    knows everyone again."""
    async with nodes(4) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        seed, others = group[0], group[1:]
        await seed.membership.close(leave=False)
        await seed.server.stop(0)
        await until(lambda: all(state_of(o, seed) == DEAD for o in others), 10.0, "the seed's death")
        back = RelayNode(
            RelayConfig(
                data_dir=tmp_path / "n0",  # the same identity
                server=ServerSettings(listen=seed.address),
                gossip=FAST_GOSSIP,  # no seeds
            )
        )
        await back.start()
        try:
            await until(
                lambda: everyone_knows_everyone([back, *others]), 3 * FAST_GOSSIP.sync_interval_s + 2.0, "rejoin"
            )
        finally:
            await back.stop(0)


async def test_traffic_per_node_per_round_is_bounded(nodes: Nodes) -> None:
    gossip = FAST_GOSSIP.model_copy(update={"max_piggyback": 3, "sync_interval_s": 100.0})
    async with nodes(7, gossip) as group:
        await until(lambda: everyone_knows_everyone(group), 8.0, "full membership")
        before = [n.membership.counters.messages_sent for n in group]
        started = time.monotonic()
        await asyncio.sleep(20 * gossip.probe_interval_s)
        rounds = (time.monotonic() - started) / gossip.probe_interval_s + 1
        sent = [n.membership.counters.messages_sent - b for n, b in zip(group, before, strict=True)]
        # One probe per period, plus indirect probes only after a missed answer (which a loaded
        # machine causes now and then): bounded by the settings, not by the swarm's size.
        assert max(sent) <= rounds * (1 + gossip.indirect_probes) + 1, sent
        assert min(sent) >= rounds / 2, sent  # and everyone keeps probing
        # And no packet carries more than max_piggyback pieces of news.
        packet = group[0].membership._packet()
        assert len(packet.updates) <= gossip.max_piggyback


def test_only_the_member_itself_can_undo_a_death_claim() -> None:
    """Descriptor versions change with every load update and travel second-hand; a newer version
    relayed by others must not revive a member declared dead, only a higher incarnation, which
    only the member signs (when it refutes, or restarts)."""
    identity = native.Identity.generate()
    publisher = DescriptorPublisher(identity, [common_pb2.NODE_ROLE_RELAY], lambda: "127.0.0.1:1")
    directory = PeerDirectory()
    peer = directory.offer(publisher.describe())
    assert peer is not None
    assert directory.set_state(peer.node_id, DEAD, publisher.incarnation) is not None
    later_load = publisher.describe()  # newer version, same incarnation: e.g. gossiped by a third node
    assert directory.offer(later_load) is not None  # its content is taken...
    assert peer.state == DEAD  # ...but the member stays dead
    # Claims about an incarnation it has moved past are ignored once it refutes.
    publisher.refute()
    assert directory.offer(publisher.describe()) is not None and peer.state == ALIVE
    assert directory.set_state(peer.node_id, SUSPECT, publisher.incarnation - 1) is None
    assert peer.state == ALIVE
