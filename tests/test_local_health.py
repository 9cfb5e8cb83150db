"""Lifeguard's local health: the score alone (swarmserve/overlay/awareness.py), the event-loop lag
timer alone (swarmserve/overlay/looplag.py), and how membership applies them (no network: the
packets a Membership would send are answered by stand-ins, claims handed to it directly).
Through real processes under load: tests/test_false_deaths.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from swarmserve import native
from swarmserve.config import GossipSettings
from swarmserve.overlay import SUSPECT, DescriptorPublisher, Membership, Peer
from swarmserve.overlay.awareness import Awareness
from swarmserve.overlay.directory import ALIVE, DEAD
from swarmserve.overlay.looplag import LoopLag
from swarmserve.rpc import ChannelPool
from swarmserve.v1 import common_pb2, overlay_pb2

# --- the score alone ------------------------------------------------------------------------------


def test_the_score_stays_between_zero_and_max_minus_one_and_scales_timeouts_by_score_plus_one() -> None:
    a = Awareness(8)
    assert (a.score, a.multiplier, a.scale(0.2)) == (0, 1, 0.2)
    assert a.apply(-1) == 0 and a.score == 0  # railed at the floor: no change
    assert a.apply(3) == 3 and a.multiplier == 4
    assert a.scale(0.5) == pytest.approx(2.0)
    assert a.apply(100) == 4 and a.score == 7 and a.multiplier == 8  # railed at max - 1
    assert a.apply(1) == 0
    assert a.apply(-2) == -2 and a.score == 5


def test_a_max_multiplier_of_one_turns_it_off() -> None:
    a = Awareness(1)
    assert a.apply(5) == 0 and a.multiplier == 1 and a.scale(0.3) == 0.3
    with pytest.raises(ValueError):
        Awareness(0)


# --- the event-loop lag timer alone ---------------------------------------------------------------


async def test_a_blocked_event_loop_is_reported_late_by_about_the_time_it_was_blocked() -> None:
    lags: list[float] = []
    lag = LoopLag(interval_s=0.02, threshold_s=0.15, on_late=lags.append)
    lag.start()
    try:
        await asyncio.sleep(0.2)  # an idle loop: nothing late
        assert lags == [] and lag.late == 0
        time.sleep(0.4)  # what a blocking call (or an overloaded machine) does to every task
        await asyncio.sleep(0.1)
        assert lag.late == len(lags) >= 1
        assert 0.25 < max(lags) < 1.0, lags
        assert lag.worst_s >= max(lags)
    finally:
        await lag.close()


# --- membership with local health (no network) ---------------------------------------------------


def member(address: str) -> DescriptorPublisher:
    return DescriptorPublisher(native.Identity.generate(), [common_pb2.NODE_ROLE_RELAY], lambda: address)


SETTINGS = GossipSettings(probe_interval_s=1.0, probe_timeout_s=0.4, suspicion_mult=4, suspicion_max_mult=6)


class Scripted(Membership):
    """A membership whose packets are answered by a script instead of the network: ``direct``
    (does the probed member answer) and ``helpers`` (what each helper answers: an acknowledgement
    True, a nack False, or nothing None). Records what it sent, and with which timeout."""

    def __init__(self, members: int = 10, settings: GossipSettings = SETTINGS) -> None:
        super().__init__(member("10.0.0.1:1"), ChannelPool(), settings)
        self.others = [member(f"10.0.1.{i}:1") for i in range(members)]
        for publisher in self.others:
            self.directory.offer(publisher.describe())
        self.direct = True
        self.helpers: bool | None = False
        self.sent: list[tuple[overlay_pb2.SwimPacket, float]] = []
        self.sent_to: list[str] = []  # node ids

    async def _send(self, peer: Peer, packet: overlay_pb2.SwimPacket, timeout: float) -> Any:
        self.sent.append((packet, timeout))
        self.sent_to.append(peer.node_id)
        answered = self.helpers if packet.probe_target else self.direct
        if answered is None or (answered is False and not packet.probe_target):
            return None
        return overlay_pb2.SwimPacket(probe_acked=bool(answered))

    def peer(self, index: int = 0) -> Peer:
        found = self.directory.get(native.node_id(self.others[index].identity_key))
        assert found is not None
        return found


async def test_probe_outcomes_move_the_score_as_memberlist_does() -> None:
    m = Scripted()
    m.awareness.apply(3)
    assert await m.probe(m.peer(0)) and m.awareness.score == 2  # answered in time: -1
    m.direct = False
    m.helpers = True  # reached through a helper: the member is slow, not this node
    assert await m.probe(m.peer(1)) and m.awareness.score == 2
    m.helpers = False  # every helper says "not reached": the member's fault, no penalty
    assert not await m.probe(m.peer(2)) and m.awareness.score == 2
    assert m.peer(2).state == SUSPECT
    m.helpers = None  # no helper answers at all: this node is the one cut off, +1 each
    assert not await m.probe(m.peer(3)) and m.awareness.score == 2 + SETTINGS.indirect_probes
    assert m.counters.health_score == m.awareness.score
    alone = Scripted(members=1)
    alone.direct = False  # nobody to ask: +1
    assert not await alone.probe(alone.peer()) and alone.awareness.score == 1


async def test_timeouts_and_the_period_stretch_with_the_multiplier() -> None:
    m = Scripted()
    m.direct, m.helpers = False, False
    await m.probe(m.peer(0))
    (_, t1), *indirect = m.sent
    assert t1 == pytest.approx(0.4) and indirect[0][1] == pytest.approx(0.6)
    m.sent.clear()
    m.awareness.apply(2)
    await m.probe(m.peer(1))
    (_, t1), *indirect = m.sent
    assert t1 == pytest.approx(1.2) and indirect[0][1] == pytest.approx(1.8)  # both x3
    assert m.probe_interval_s() == pytest.approx(3.0)
    assert m.suspicion_timeout_s() == pytest.approx(3 * 4.0)


async def test_a_helper_answers_before_its_callers_deadline() -> None:
    """A helper that cannot reach the target must say so in time: the caller counts silence
    against its own health."""
    m = Scripted()
    m.direct = False
    m.awareness.apply(7)  # a slow helper: its own probe timeout would be 3.2 s
    asker = member("10.0.2.1:1")
    packet = asker.sign(overlay_pb2.SwimPacket(sender=asker.describe(), probe_target=m.others[0].identity_key))
    answer = await m.on_swim(packet, time_remaining_s=0.5)
    assert not answer.probe_acked
    assert m.sent[-1][1] == pytest.approx(0.4)  # 80% of the caller's 0.5 s


async def test_refuting_a_suspicion_and_a_late_event_loop_raise_the_score() -> None:
    m = Scripted()
    claimant = m.others[0]
    m._on_claim(claimant.claim(m.own_key, SUSPECT, m.publisher.incarnation), left=False)
    assert m.awareness.score == 1 and m.counters.refutations == 1
    m._on_late(0.05)  # less than one probe timeout late: +1
    m._on_late(1.0)  # 2.5 probe timeouts late: +3
    assert m.awareness.score == 5 and m.counters.late_loop == 2
    assert m.counters.worst_loop_lag_s == 1.0


async def test_a_degraded_node_gives_suspects_longer_and_never_shortens_a_suspicion() -> None:
    m = Scripted(members=2)  # too few members to expect confirmations: the minimum timeout at once
    victim, other = m.peer(0), m.peer(1)
    base = m.suspicion_timeout_s()
    m.awareness.apply(1)
    m._suspect(victim.node_id)
    started = victim.state_since
    m.expire(started + base * 1.9)
    assert victim.state == SUSPECT  # twice as long at multiplier 2
    m._on_late(2 * SETTINGS.probe_timeout_s)  # worse while it runs: x4 from now on
    m.awareness.apply(-10)  # recovered: the suspicion keeps the longest stretch it had
    m.expire(started + base * 3.9)
    assert victim.state == SUSPECT
    m.expire(started + base * 4.01)
    assert victim.state == DEAD
    m._suspect(other.node_id)  # healthy again: back to the plain timeout
    m.expire(other.state_since + base + 0.01)
    assert other.state == DEAD


async def test_a_callers_failure_suspects_at_once_when_healthy_and_after_a_probe_when_degraded() -> None:
    m = Scripted()
    m.suspect(m.peer(0).node_id)
    assert m.peer(0).state == SUSPECT and m.sent == []  # healthy: no probe, the caller's word counts
    m.awareness.apply(1)
    m.direct = True  # the member answers the probe: the failure was this node's slowness
    m.suspect(m.peer(1).node_id)
    m.suspect(m.peer(1).node_id)  # one probe at a time per member
    await asyncio.gather(*m._checks.values())
    assert m.peer(1).state == ALIVE and len(m.sent) == 1
    m.direct, m.helpers = False, False  # nobody reaches it: suspected
    m.suspect(m.peer(2).node_id)
    await asyncio.gather(*m._checks.values())
    assert m.peer(2).state == SUSPECT


async def test_a_suspect_member_is_told_in_the_probe_itself() -> None:
    m = Scripted()
    victim = m.peer(0)
    m._suspect(victim.node_id)
    m._news.clear()  # the news already went round: only the probe itself can tell it
    await m.probe(victim)
    packet, _ = m.sent[0]
    told = [u for u in packet.updates if u.identity_key == victim.descriptor.identity_key]
    assert [(u.state, u.incarnation, u.claimant) for u in told] == [(SUSPECT, victim.descriptor.incarnation, m.own_key)]
    assert len(packet.updates) <= SETTINGS.max_piggyback


def test_the_multiplier_can_be_turned_off() -> None:
    m = Membership(member("10.0.0.1:1"), ChannelPool(), SETTINGS.model_copy(update={"awareness_max_multiplier": 1}))
    m._on_late(10.0)
    assert m.awareness.score == 0 and m.probe_timeout_s() == SETTINGS.probe_timeout_s


async def test_a_refutation_is_pushed_at_once_to_the_claimant_and_a_few_others() -> None:
    m = Scripted()
    claimant = m.others[3]
    m._on_claim(claimant.claim(m.own_key, SUSPECT, m.publisher.incarnation), left=False)
    m._on_claim(m.others[4].claim(m.own_key, SUSPECT, m.publisher.incarnation), left=False)  # a second
    assert m._pushing is not None
    await m._pushing
    assert len(m.sent) == SETTINGS.indirect_probes + 1  # one push at a time, bounded
    assert native.node_id(claimant.identity_key) in m.sent_to and len(set(m.sent_to)) == len(m.sent_to)
    for packet, _ in m.sent:  # every one carries the newest incarnation, which refutes
        assert any(u.identity_key == m.own_key and u.incarnation == m.publisher.incarnation for u in packet.updates)
