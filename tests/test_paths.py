"""Path choice alone (swarmserve/dispatch/paths.py): drawn by stake, Sybils without stake left
out, no two hops of one operator or one network, and what happens when no such path exists."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swarmserve.dispatch import Hop, NoDiversePath, choose_path, network_of


def hop(name: str, operator: str | None = None, network: str | None = None, stake: int = 0) -> Hop:
    return Hop(name, (operator or name).encode(), network, stake)


EXIT = hop("exit", network="10.9.0.0/16", stake=100)


def test_networks_are_ipv4_16_and_ipv6_32_and_loopback_and_names_are_exempt() -> None:
    assert network_of("10.1.2.3:7000") == network_of("10.1.200.9:1") == "10.1.0.0/16"
    assert network_of("10.2.0.1:7000") != network_of("10.1.0.1:7000")
    assert network_of("[2001:db8:aa::1]:7000") == "2001:db8::/32"
    assert network_of("127.0.0.1:7000") is None and network_of("[::1]:7000") is None
    assert network_of("relay.example.org:7000") is None


def test_relays_are_drawn_in_proportion_to_stake() -> None:
    rng = random.Random(7)
    relays = [hop("big", stake=90), hop("small", stake=10)]
    picks = Counter(choose_path(relays, 1, EXIT, rng)[0].node_id for _ in range(2000))
    # p = 0.9: 1800 expected, sd 13.4; uniform (1000) is far outside.
    assert 1740 <= picks["big"] <= 1860, picks


def test_a_thousand_sybils_without_stake_buy_no_path() -> None:
    rng = random.Random(1)
    honest = [hop(f"h{i}", network=f"10.{i}.0.0/16", stake=50) for i in range(5)]
    sybils = [hop(f"s{i}", operator="mallory", network=f"11.{i % 250}.0.0/16") for i in range(1000)]
    for _ in range(300):
        path = choose_path([*sybils, *honest], 3, EXIT, rng)
        assert all(h.node_id.startswith("h") for h in path)


def test_no_two_hops_share_an_operator_or_a_network_and_none_shares_the_exits() -> None:
    rng = random.Random(3)
    relays = [
        hop("a1", operator="a", network="10.1.0.0/16", stake=10),
        hop("a2", operator="a", network="10.2.0.0/16", stake=10),
        hop("b", network="10.1.0.0/16", stake=10),  # a1's network
        hop("c", network="10.9.0.0/16", stake=1000),  # the exit's network
        hop("d", operator="exit", network="10.4.0.0/16", stake=1000),  # the exit's operator
        hop("e", network="10.5.0.0/16", stake=10),
    ]
    seen = set()
    for _ in range(500):
        path = choose_path(relays, 2, EXIT, rng)
        assert len({h.operator for h in path} | {EXIT.operator}) == 3
        assert len({h.network for h in path} | {EXIT.network}) == 3
        assert not {"c", "d"} & {h.node_id for h in path}
        seen.add(frozenset(h.node_id for h in path))
    assert seen == {frozenset(p) for p in ({"a1", "e"}, {"a2", "e"}, {"a2", "b"}, {"b", "e"})}


def test_without_stake_paths_are_uniform_and_loopback_swarms_still_make_paths() -> None:
    rng = random.Random(5)
    relays = [hop(f"r{i}") for i in range(3)]  # no ledger: no stake, all on loopback (network None)
    picks = Counter(h.node_id for _ in range(1500) for h in choose_path(relays, 3, hop("x"), rng))
    assert set(picks) == {"r0", "r1", "r2"} and all(n == 1500 for n in picks.values())
    first = Counter(choose_path(relays, 1, hop("x"), rng)[0].node_id for _ in range(1500))
    assert all(420 <= n <= 580 for n in first.values()), first  # 500 each, sd 18


def test_too_few_diverse_relays_is_a_clear_refusal() -> None:
    relays = [hop(f"r{i}", operator="one", stake=10) for i in range(4)]
    with pytest.raises(NoDiversePath, match="no two hops of one operator"):
        choose_path(relays, 2, EXIT, random.Random(0))
    assert choose_path(relays, 0, EXIT, random.Random(0)) == []
