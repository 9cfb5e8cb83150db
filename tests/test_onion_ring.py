"""The onion key ring alone (swarmserve/keys/onion_ring.py), on a hand-driven clock: rotation
with an overlap window, tags remembered per key and only for accepted set-ups, a full cache
retiring its key, and a restart (a new ring) that cannot peel anything recorded before."""

from __future__ import annotations

import pytest

from swarmserve import native
from swarmserve.keys import OnionKeyRing


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def setup_for(public_key: bytes) -> bytes:
    return native.Circuit.build([(public_key, b"")])[0]


def test_keys_rotate_and_the_previous_key_is_accepted_only_for_the_overlap() -> None:
    clock = Clock()
    ring = OnionKeyRing(lifetime_s=100, overlap_s=10, replay_capacity=16, clock=clock)
    first = ring.public_key
    assert ring.expires_unix_ms == int((clock.now + 110) * 1000)
    recorded = setup_for(first)
    clock.now += 100  # the first key is replaced
    second = ring.public_key
    assert second != first and ring.accepted_keys() == [second, first]
    assert ring.expires_unix_ms == int((clock.now + 110) * 1000)
    ring.accept(ring.open(recorded))  # built from the old descriptor, inside the overlap: accepted
    clock.now += 10
    assert ring.accepted_keys() == [second]
    with pytest.raises(native.CellAuthenticationError):
        ring.open(setup_for(first))  # the first key is gone
    ring.accept(ring.open(setup_for(second)))


def test_a_tag_is_remembered_only_when_the_setup_is_accepted() -> None:
    ring = OnionKeyRing(replay_capacity=16, clock=Clock())
    cell = setup_for(ring.public_key)
    opened = ring.open(cell)
    assert ring.remembered == 0  # opened and refused (say, a next hop that is no member)
    ring.open(cell)  # so the same cell may be opened again
    ring.accept(opened)
    assert ring.remembered == 1
    with pytest.raises(native.ReplayError):
        ring.accept(ring.open(cell))
    assert ring.remembered == 1


def test_replays_under_the_previous_key_are_refused_during_the_overlap() -> None:
    clock = Clock()
    ring = OnionKeyRing(lifetime_s=100, overlap_s=50, replay_capacity=16, clock=clock)
    cell = setup_for(ring.public_key)
    ring.accept(ring.open(cell))
    clock.now += 100
    with pytest.raises(native.ReplayError):
        ring.accept(ring.open(cell))  # the old key's tags went with it to the overlap


def test_a_full_replay_cache_retires_its_key_at_once() -> None:
    ring = OnionKeyRing(replay_capacity=2, clock=Clock())
    first = ring.public_key
    for _ in range(2):
        ring.accept(ring.open(setup_for(first)))
    with pytest.raises(native.ReplayCacheFullError):
        ring.accept(ring.open(setup_for(first)))
    assert ring.public_key != first  # a new key, with room, is published
    ring.accept(ring.open(setup_for(ring.public_key)))
    with pytest.raises(native.ReplayCacheFullError):
        ring.accept(ring.open(setup_for(first)))  # the old key still refuses rather than forgets


def test_a_new_ring_cannot_open_what_an_old_one_accepted() -> None:
    before = OnionKeyRing(clock=Clock())
    cell = setup_for(before.public_key)
    before.accept(before.open(cell))
    after = OnionKeyRing(clock=Clock())  # the same node after a restart
    with pytest.raises(native.CellAuthenticationError):
        after.open(cell)


def test_junk_is_refused_by_every_key() -> None:
    clock = Clock()
    ring = OnionKeyRing(lifetime_s=100, overlap_s=50, clock=clock)
    clock.now += 100
    assert len(ring.accepted_keys()) == 2
    with pytest.raises(native.CellAuthenticationError):
        ring.open(bytes(native.SETUP_CELL_SIZE))
    with pytest.raises(native.MalformedCellError):
        ring.open(b"short")
    with pytest.raises(ValueError):
        OnionKeyRing(lifetime_s=0)


def test_a_peer_whose_published_key_is_about_to_expire_carries_no_circuit() -> None:
    import time

    from swarmserve.overlay import Peer
    from swarmserve.v1 import common_pb2

    def peer(expires_ms: int, key: bytes = bytes(32)) -> Peer:
        descriptor = common_pb2.NodeDescriptor(onion_key=key, onion_key_expires_unix_ms=expires_ms)
        return Peer("n", descriptor, common_pb2.SignedDescriptor(), 0.0)

    now_ms = int(time.time() * 1000)
    assert peer(now_ms + 600_000).onion_key_usable()
    assert not peer(now_ms + 10_000).onion_key_usable()  # within the 30 s margin
    assert not peer(now_ms - 1).onion_key_usable()
    assert peer(0).onion_key_usable()  # no expiry published
    assert not peer(0, key=b"").onion_key_usable()  # no onion key at all
