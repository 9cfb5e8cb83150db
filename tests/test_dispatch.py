"""Dispatch policies and the prefix tree: the rules the router, offloading nodes and the
overlay simulation share."""

from __future__ import annotations

import random

import pytest

from swarmserve.dispatch import (
    CHUNK_TOKENS,
    CentralOraclePolicy,
    LocalOnlyPolicy,
    NodeState,
    OverlayPolicy,
    PrefixTree,
    RandomPolicy,
    RoundRobinPolicy,
    load_factor,
)


def state(
    node: str, latency: float = 1.0, queued: int = 0, slots: int = 1, running: int = 0, reputation: float = 1.0
) -> NodeState:
    return NodeState(node, latency, slots, running, queued, reputation=reputation)


def test_prefix_tree_matches_whole_chunk_prefixes_per_node() -> None:
    tree = PrefixTree()
    shared = list(range(35))
    tree.insert("a", shared, now=1)
    tree.insert("b", shared[:20] + [900] * 15, now=2)
    assert tree.match(shared) == {"a": 3, "b": 2}
    assert tree.match(shared[:9]) == {}  # less than one chunk
    assert tree.match([7] * 40) == {}
    tree.forget("a")
    assert tree.match(shared) == {"b": 2}


def test_prefix_tree_is_bounded_lru() -> None:
    tree = PrefixTree(capacity=3)
    tree.insert("a", list(range(CHUNK_TOKENS * 2)), now=1)  # 2 prefixes
    tree.insert("b", [5] * CHUNK_TOKENS * 2, now=2)  # 2 more: the oldest goes
    assert len(tree) == 3
    assert tree.match(list(range(CHUNK_TOKENS * 2))) == {}  # its first chunk was evicted


def test_load_factor_counts_queue_rounds_and_never_rewards_claimed_idleness() -> None:
    assert load_factor(state("a", latency=2.0, slots=2)) == 2.0  # idle: its latency
    assert load_factor(state("a", latency=2.0, slots=2, running=1)) == 3.0  # half a round ahead
    assert load_factor(state("a", latency=2.0, slots=2, running=2, queued=4)) == 8.0  # three rounds
    # A node that claims an empty queue but was observed slow still scores by its latency.
    assert load_factor(state("liar", latency=9.0)) > load_factor(state("honest", latency=1.0, running=1, queued=5))


def test_overlay_prefers_the_warm_cache_unless_it_is_overloaded() -> None:
    policy = OverlayPolicy()
    prompt = list(range(50))
    policy.served("warm", prompt, now=1)
    nodes = [state("warm", latency=1.0), state("cold-1", latency=0.8), state("cold-2", latency=0.9), state("cold-3")]
    assert policy.choose(prompt, nodes, "r") == "warm"  # affinity among acceptable loads
    overloaded = [state("warm", latency=1.0, running=1, queued=50), *nodes[1:]]
    assert policy.choose(prompt, overloaded, "r") == "cold-1"  # past the 80th percentile: least loaded
    assert policy.choose([999] * 50, nodes, "r") == "cold-1"  # no match: least loaded


def test_overlay_gives_untrusted_nodes_nothing() -> None:
    policy = OverlayPolicy()
    nodes = [state("cheap-liar", latency=0.01, reputation=0.1), state("honest", latency=1.0)]
    assert policy.choose([1] * 20, nodes, "r") == "honest"
    with pytest.raises(ValueError, match="no trusted node"):
        policy.choose([1] * 20, nodes[:1], "r")


def test_baselines() -> None:
    nodes = [state("a"), state("b"), state("c")]
    rr = RoundRobinPolicy()
    assert [rr.choose([], nodes, "r") for _ in range(6)] == ["b", "c", "a", "b", "c", "a"]
    rnd = RandomPolicy(random.Random(1))
    assert {rnd.choose([], nodes, "r") for _ in range(50)} == {"a", "b", "c"}
    local = LocalOnlyPolicy(lambda entry: f"node-of-{entry}")
    assert local.choose([], nodes, "r7") == "node-of-r7"
    assert CentralOraclePolicy().choose([], [state("a", latency=3), state("b", latency=1)], "r") == "b"
