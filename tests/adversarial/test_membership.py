"""Issue 14, attacks 1 and 6 (in part) on membership, through the public ``Overlay`` service of
real nodes. Attack 1, removing a live node from the swarm with forged gossip. Tried, at every other member and at the victim itself: DEAD and
SUSPECT claims without the victim's signature at its current incarnation, at the next one and
at 2^64-1 (which used to be irrefutable and to overflow the victim's refutation); a goodbye
signed by another key; the victim's own goodbye from an earlier incarnation, replayed. The
victim stays alive in every member's view, is never declared dead, keeps answering gossip and
health checks, and its incarnation moves by refutations only (one each), never to where a claim
pointed. The control: its own signed goodbye still takes it out at once."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swarmserve import native
from swarmserve.overlay import ALIVE, DEAD, DescriptorPublisher
from swarmserve.overlay.membership import MAX_PUSHED
from swarmserve.overlay.packets import leave_message
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from tests.test_membership import Nodes, Stranger, everyone_knows_everyone, nodes, state_of, until  # noqa: F401

MAX_U64 = 2**64 - 1


async def test_forged_death_claims_never_remove_a_live_node(nodes: Nodes) -> None:  # noqa: F811
    async with nodes(4) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        victim = group[1]
        key = victim.keys.identity.public_key
        liar = Stranger()  # a member: it signs its packets and its claims, as it must to be heard
        attacker = liar.identity
        incarnation = victim.membership.publisher.incarnation
        DEAD_, SUSPECT_ = overlay_pb2.MEMBER_STATE_DEAD, overlay_pb2.MEMBER_STATE_SUSPECT
        lies = [
            liar.claim(key, state, claimed)
            for state in (DEAD_, SUSPECT_)
            for claimed in (incarnation, incarnation + 1, MAX_U64)
        ] + [
            overlay_pb2.MemberUpdate(
                identity_key=key,
                state=DEAD_,
                incarnation=incarnation,
                leave_signature=attacker.sign(leave_message(key, incarnation)),
            ),
            overlay_pb2.MemberUpdate(  # a goodbye from the victim's earlier life, replayed
                identity_key=key,
                state=DEAD_,
                incarnation=incarnation - 1,
                leave_signature=victim.keys.identity.sign(leave_message(key, incarnation - 1)),
            ),
        ]
        for target in group:
            async with aio.insecure_channel(target.address) as channel:
                stub = overlay_pb2_grpc.OverlayStub(channel)
                for lie in lies:
                    await stub.Swim(liar.packet(updates=[lie]))
        # For three suspicion timeouts, nobody ever holds the victim dead.
        watch = 3 * group[0].membership.suspicion_timeout_s()
        deadline = time.monotonic() + watch
        while time.monotonic() < deadline:
            assert all(state_of(o, victim) != DEAD for o in group if o is not victim)
            await asyncio.sleep(0.02)
        await until(lambda: everyone_knows_everyone(group), 5.0, "the victim alive everywhere")
        refutations = victim.membership.publisher.incarnation - incarnation
        assert 0 <= refutations <= 3, refutations  # only claims about its current incarnation are answered
        async with aio.insecure_channel(victim.address) as channel:
            answer = await overlay_pb2_grpc.OverlayStub(channel).Swim(liar.packet())
            assert answer.sender.descriptor
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The control: the node's own goodbye, signed at its current incarnation, is final at once.
        leaving = group[3]
        await leaving.membership.close(leave=True)
        await until(lambda: all(state_of(o, leaving) == DEAD for o in group[:3]), 2.0, "a genuine leave")
        assert all(state_of(o, victim) == ALIVE for o in (group[0], group[2]))


async def test_a_flood_of_descriptors_from_one_sender_is_bounded(nodes: Nodes) -> None:  # noqa: F811
    """Issue 14, attack 6 (in part): one sender pushes 1,000 genuinely signed descriptors of fresh
    identities (free to make) in one exchange, and 1,000 pieces of news in one probe: both are
    refused with RESOURCE_EXHAUSTED before any is verified, and the directory does not grow; a
    push within the bound is taken."""
    async with nodes(2) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        target = group[0]
        before = len(target.membership.directory.peers())

        def fresh(i: int) -> common_pb2.SignedDescriptor:
            publisher = DescriptorPublisher(
                native.Identity.generate(), [common_pb2.NODE_ROLE_RELAY], lambda: f"127.0.0.1:{20000 + i}"
            )
            return publisher.describe()

        flood = [fresh(i) for i in range(1000)]
        sender = Stranger()
        async with aio.insecure_channel(target.address) as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            for push in (
                stub.Exchange(sender.exchange(updates=flood)),
                stub.Swim(
                    sender.packet(
                        updates=[overlay_pb2.MemberUpdate(identity_key=b"", state=ALIVE, descriptor=d) for d in flood]
                    )
                ),
            ):
                with pytest.raises(aio.AioRpcError) as refused:
                    await push
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"at most {MAX_PUSHED}" in (refused.value.details() or "")
            assert len(target.membership.directory.peers()) == before
            await stub.Exchange(sender.exchange(updates=flood[: MAX_PUSHED - 1]))
            assert len(target.membership.directory.peers()) == before + MAX_PUSHED  # the sender and its 63
