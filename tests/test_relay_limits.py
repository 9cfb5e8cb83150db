"""Per-source set-up limits alone (services/relay/limits.py), on a hand-driven clock."""

from __future__ import annotations

import pytest

from services.relay.limits import SourceLimits, source_of
from swarmserve.rpc import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_peer_strings_map_to_sources() -> None:
    assert source_of("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert source_of("ipv6:[2001:db8:1:2:3:4:5:6]:443") == "2001:db8:1:2::/64"
    assert source_of("ipv6:[2001:db8:1:2:ffff::1]:1") == source_of("ipv6:[2001:db8:1:2::9]:2")  # one /64
    assert source_of("ipv6:[::1]:9") == "::/64"
    assert source_of("unix:/tmp/s") == "unix"


def test_a_source_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limits = SourceLimits(setups_per_s=2, setup_burst=3, circuits_per_source=100, clock=clock)
    for _ in range(3):
        limits.admit("a")
        limits.release("a")
    with pytest.raises(ResourceExhausted, match="faster"):
        limits.admit("a")
    limits.admit("b")  # another source has its own allowance
    clock.now += 0.5  # one token back
    limits.admit("a")
    with pytest.raises(ResourceExhausted):
        limits.admit("a")


def test_open_circuits_per_source_are_bounded_and_released() -> None:
    limits = SourceLimits(setups_per_s=100, setup_burst=100, circuits_per_source=2, clock=Clock())
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(ResourceExhausted, match="maximum of 2 circuits"):
        limits.admit("a")
    assert limits.open_circuits("a") == 2
    limits.release("a")
    limits.admit("a")
    limits.release("nobody")  # releasing what was never admitted changes nothing
    assert limits.open_circuits("nobody") == 0


def test_tracked_sources_are_bounded_and_idle_ones_forgotten() -> None:
    clock = Clock()
    limits = SourceLimits(setups_per_s=1, setup_burst=2, circuits_per_source=5, max_sources=2, clock=clock)
    limits.admit("a")
    limits.admit("b")
    with pytest.raises(ResourceExhausted, match="sources"):
        limits.admit("c")  # a and b hold circuits: nothing can be forgotten
    limits.release("a")
    with pytest.raises(ResourceExhausted):
        limits.admit("c")  # a is idle but its bucket has not refilled: forgetting it would gift tokens
    clock.now += 2
    limits.admit("c")


def test_a_member_address_gets_the_member_factor() -> None:
    limits = SourceLimits(setups_per_s=1, setup_burst=2, circuits_per_source=1, member_factor=4, clock=Clock())
    for _ in range(4):
        limits.admit("relay", lambda: True)
    with pytest.raises(ResourceExhausted, match="maximum of 4 circuits"):
        limits.admit("relay", lambda: True)
    limits.admit("stranger", lambda: False)
    with pytest.raises(ResourceExhausted, match="maximum of 1 circuits"):
        limits.admit("stranger", lambda: True)  # asked only when first seen
