"""Issue 14, attack 6 (in part): gossip in plaintext and without limits. Tried through the public
``Overlay`` service of real nodes:

- Messages altered on the wire (a field changed after the sender signed: an added piece of
  news, a flipped acknowledgement, another probe target), unsigned, signed by another key than
  the sender's, or replayed two minutes after they were made: refused with UNAUTHENTICATED, and
  nothing in them is taken. The control: the same message as signed is taken.
- One member sending 300 valid, signed probes as fast as it can: after its burst it gets
  RESOURCE_EXHAUSTED, while another member is still answered and the swarm's own members all
  stay alive in each other's views.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc import aio

from swarmserve import native
from swarmserve.overlay import sign_descriptor
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from tests.test_membership import Nodes, Stranger, everyone_knows_everyone, nodes, until  # noqa: F401


async def refused(call: object, message: object) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as error:
        await call(message)  # type: ignore[operator]
    return error.value.code()


async def test_altered_unsigned_forged_and_replayed_gossip_is_refused(nodes: Nodes) -> None:  # noqa: F811
    async with nodes(2) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        target, victim = group
        stranger, other = Stranger("127.0.0.1:11"), Stranger("127.0.0.1:12")
        before = len(target.membership.directory.peers())
        async with aio.insecure_channel(target.address) as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            added = stranger.packet()
            added.updates.append(other.claim(victim.keys.identity.public_key, overlay_pb2.MEMBER_STATE_SUSPECT, 1))
            flipped = stranger.packet()
            flipped.probe_acked = True
            retargeted = stranger.packet(probe_target=victim.keys.identity.public_key)
            retargeted.probe_target = stranger.identity.public_key
            unsigned = stranger.packet()
            unsigned.signature = b""
            impostor = stranger.packet()
            impostor.signature = other.identity.sign(b"anything")
            # A message as its sender made it two minutes ago (its descriptor says when).
            old = common_pb2.NodeDescriptor.FromString(stranger.publisher.describe().descriptor)
            old.issued_unix_ms -= 120_000
            replayed = stranger.publisher.sign(overlay_pb2.SwimPacket(sender=sign_descriptor(stranger.identity, old)))
            exchange = stranger.exchange()
            exchange.updates.append(other.publisher.describe())
            for message in (added, flipped, retargeted, unsigned, impostor, replayed):
                assert await refused(stub.Swim, message) == grpc.StatusCode.UNAUTHENTICATED
            assert await refused(stub.Exchange, exchange) == grpc.StatusCode.UNAUTHENTICATED
            assert len(target.membership.directory.peers()) == before  # nothing was taken
            # The control: the stranger's own message as signed is taken (it joins).
            await stub.Swim(stranger.packet())
            assert target.membership.directory.get(stranger.identity.node_id) is not None


async def test_one_sender_flooding_probes_is_limited_and_others_are_not(nodes: Nodes) -> None:  # noqa: F811
    async with nodes(3) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        target = group[0]
        flooder, bystander = Stranger("127.0.0.1:13"), Stranger("127.0.0.1:14")
        settings = target.membership.settings
        packets = [flooder.packet() for _ in range(300)]
        answered = limited = 0
        started = time.monotonic()
        async with aio.insecure_channel(target.address) as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            for packet in packets:
                try:
                    await stub.Swim(packet)
                    answered += 1
                except aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    limited += 1
            elapsed = time.monotonic() - started
            assert limited > 0
            assert answered <= settings.sender_burst + settings.sender_packets_per_s * elapsed + 1
            await stub.Swim(bystander.packet())  # another sender has its own allowance
        assert everyone_knows_everyone(group)
        assert native.node_id(flooder.identity.public_key) in {p.node_id for p in target.membership.directory.peers()}


async def test_counters_far_ahead_of_the_clock_are_refused(nodes: Nodes) -> None:  # noqa: F811
    """A member's own, genuinely signed descriptor whose version, incarnation or issue time is a
    year ahead (or at 2^64-1) is refused: as a message's sender (UNAUTHENTICATED) and as news (not
    taken). The control: the same member with honest counters joins."""
    async with nodes(1) as group:
        target = group[0]
        year_ms = 365 * 24 * 3600 * 1000
        async with aio.insecure_channel(target.address) as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            for field, value in (
                ("incarnation", 2**64 - 1),
                ("incarnation", int(time.time() * 1000) + year_ms),
                ("version", 2**64 - 1),
            ):
                liar = Stranger("127.0.0.1:15")
                if field == "incarnation":
                    liar.publisher.incarnation = value
                else:
                    liar.publisher._version = value - 3
                assert await refused(stub.Swim, liar.packet()) == grpc.StatusCode.UNAUTHENTICATED
                carrier = Stranger("127.0.0.1:16")
                news = overlay_pb2.MemberUpdate(
                    state=overlay_pb2.MEMBER_STATE_ALIVE, descriptor=liar.publisher.describe()
                )
                await stub.Swim(carrier.packet(updates=[news]))
                assert target.membership.directory.get(liar.identity.node_id) is None, field
            honest = Stranger("127.0.0.1:17")
            await stub.Swim(honest.packet())
            assert target.membership.directory.get(honest.identity.node_id) is not None
