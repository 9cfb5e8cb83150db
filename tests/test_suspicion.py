"""Lifeguard's suspicion alone (swarmserve/overlay/suspicion.py), and as membership applies it
to signed claims (no network: claims handed to a Membership directly, a hand-driven clock)."""

from __future__ import annotations

import pytest

from swarmserve import native
from swarmserve.config import GossipSettings
from swarmserve.overlay import SUSPECT, DescriptorPublisher, Membership
from swarmserve.overlay.directory import ALIVE, DEAD
from swarmserve.overlay.suspicion import Suspicion, expected_confirmations
from swarmserve.rpc import ChannelPool
from swarmserve.v1 import common_pb2


def test_the_timeout_shrinks_from_max_to_min_with_independent_confirmations() -> None:
    s = Suspicion(b"a", expected=3, min_s=1.0, max_s=6.0, started=0.0)
    assert s.timeout_s() == 6.0
    assert not s.confirm(b"a")  # the first claimant again: no confirmation
    assert s.confirm(b"b")
    assert 1.0 < s.timeout_s() < 6.0
    s.confirm(b"c")
    s.confirm(b"d")
    assert s.timeout_s() == pytest.approx(1.0)
    s.confirm(b"e")  # beyond K: never below the minimum
    assert s.timeout_s() == pytest.approx(1.0)
    assert s.expired(1.0) and not Suspicion(b"a", 3, 1.0, 6.0, 0.0).expired(5.9)


def test_small_swarms_expect_no_confirmation() -> None:
    assert expected_confirmations(4, members=10) == 2
    assert expected_confirmations(4, members=3) == 0  # fewer than K others could confirm
    assert Suspicion(b"a", expected=0, min_s=1.0, max_s=6.0, started=0.0).timeout_s() == 1.0


def member(address: str) -> DescriptorPublisher:
    return DescriptorPublisher(native.Identity.generate(), [common_pb2.NODE_ROLE_RELAY], lambda: address)


def test_one_liar_cannot_shorten_a_suspicion_and_members_confirmations_do() -> None:
    settings = GossipSettings(probe_interval_s=1.0, suspicion_mult=4, suspicion_max_mult=6)
    me = member("10.0.0.1:1")
    membership = Membership(me, ChannelPool(), settings)
    victim, liar, honest = member("10.0.0.2:1"), member("10.0.0.3:1"), member("10.0.0.4:1")
    others = [member(f"10.0.1.{i}:1") for i in range(10)]  # enough members to expect K = 2
    for publisher in [victim, liar, honest, *others]:
        membership.directory.offer(publisher.describe())
    peer = membership.directory.get(native.node_id(victim.identity_key))
    assert peer is not None
    minimum = membership.suspicion_timeout_s()
    claim = liar.claim(victim.identity_key, SUSPECT, victim.incarnation)
    membership._on_claim(claim, left=False)
    assert peer.state == SUSPECT
    started = peer.state_since
    for _ in range(5):
        membership._on_claim(liar.claim(victim.identity_key, SUSPECT, victim.incarnation), left=False)
    stranger = member("10.0.0.9:1")  # not a member: its claims count for nothing
    membership._on_claim(stranger.claim(victim.identity_key, SUSPECT, victim.incarnation), left=False)
    membership.expire(started + 5.9 * minimum)
    assert peer.state == SUSPECT, "one claimant (however often it repeats itself) made the suspicion short"
    membership.expire(started + 6.0 * minimum + 0.01)
    assert peer.state == DEAD
    # Refuted and suspected again: an independent member's confirmation shortens it.
    victim.refute()
    membership.directory.offer(victim.describe())
    assert peer.state == ALIVE
    membership._on_claim(liar.claim(victim.identity_key, SUSPECT, victim.incarnation), left=False)
    membership._on_claim(honest.claim(victim.identity_key, SUSPECT, victim.incarnation), left=False)
    membership.suspect(peer.node_id)  # this node's own probe failed too: a second confirmation
    again = peer.state_since
    membership.expire(again + minimum - 0.01)
    assert peer.state == SUSPECT
    membership.expire(again + minimum + 0.01)
    assert peer.state == DEAD
