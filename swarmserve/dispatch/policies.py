"""Dispatch policies. Each picks one node for a request from the states it is given; what those
states are (gossiped, possibly stale, or the truth) is the caller's business, which is what
separates the decentralized policies from the central oracle."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from swarmserve.dispatch.prefix_tree import PrefixTree
from swarmserve.trust.reputation import TRUST_THRESHOLD
from swarmserve.v1 import common_pb2

__all__ = [
    "TRUST_THRESHOLD",
    "CentralOraclePolicy",
    "LocalOnlyPolicy",
    "NodeState",
    "OverlayPolicy",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "load_factor",
    "reported_state",
]


@dataclass(frozen=True)
class NodeState:
    """What a dispatcher knows of one inference node."""

    node_id: str
    recent_latency_s: float  # mean end-to-end latency of its recent requests
    slots: int  # requests it runs at once (its batch)
    running: int = 0
    queued: int = 0  # waiting for a slot (plus what the caller sent it since it last heard)
    reputation: float = 1.0  # from verification; below the trust threshold it gets nothing


def reported_state(
    node_id: str, load: common_pb2.LoadReport, capacity: common_pb2.Capacity, pending: int = 0
) -> NodeState:
    """A node's state as its descriptor or ``Inference.Status`` reports it, plus ``pending``
    requests the caller sent it that the report cannot count yet."""
    return NodeState(
        node_id,
        recent_latency_s=load.recent_latency_us / 1e6,
        slots=capacity.max_concurrent,
        running=load.running,
        queued=load.queued + pending,
    )


def load_factor(state: NodeState) -> float:
    """Roughly how long a new request would take there: PlanetServe's BF = recent mean latency x
    batch rounds of work ahead, with the rounds counted in requests and fractionally,
    (running + queued) / slots, so that every request ahead counts (a ceil() over a token queue
    rounds a busy node down to idle when requests are short). An idle node scores its latency
    alone (never zero), so a node that claims to be idle but is slow still scores by what was
    observed of it."""
    rounds_ahead = (state.running + state.queued) / max(state.slots, 1)
    return max(state.recent_latency_s, 1e-3) * (1 + rounds_ahead)


class Policy(Protocol):
    name: str

    def choose(self, prompt_ids: Sequence[int], nodes: Sequence[NodeState], entry: str) -> str:
        """The node to serve a request that arrived at ``entry`` (a router or node id)."""
        ...

    def served(self, node_id: str, prompt_ids: Sequence[int], now: float) -> None:
        """Told after dispatch, so policies that learn (prefix affinity) can."""
        ...


class _Stateless:
    name = "stateless"

    def served(self, node_id: str, prompt_ids: Sequence[int], now: float) -> None:
        return None


class RoundRobinPolicy(_Stateless):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, prompt_ids: Sequence[int], nodes: Sequence[NodeState], entry: str) -> str:
        self._next += 1
        return nodes[self._next % len(nodes)].node_id


class RandomPolicy(_Stateless):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, prompt_ids: Sequence[int], nodes: Sequence[NodeState], entry: str) -> str:
        return self._rng.choice(nodes).node_id


class LocalOnlyPolicy(_Stateless):
    """No forwarding: every entry point serves on its own node (``home`` maps entry -> node)."""

    name = "local-only"

    def __init__(self, home: Callable[[str], str]) -> None:
        self._home = home

    def choose(self, prompt_ids: Sequence[int], nodes: Sequence[NodeState], entry: str) -> str:
        return self._home(entry)


class OverlayPolicy:
    """Ours (PlanetServe's rule, with a trust floor): among nodes whose cache matches a prefix
    of the prompt, keep those whose load factor is at most the ``percentile`` of all load
    factors and take the longest match; otherwise the lowest load factor. Untrusted nodes
    (reputation below ``trust_floor``) get nothing."""

    name = "overlay"

    def __init__(
        self,
        percentile: float = 0.8,
        trust_floor: float = TRUST_THRESHOLD,
        tree: PrefixTree | None = None,
        near_best: float = 1.25,
        rng: random.Random | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self.percentile = percentile
        self.near_best = near_best
        self.trust_floor = trust_floor
        self.tree = tree or PrefixTree()

    def choose(self, prompt_ids: Sequence[int], nodes: Sequence[NodeState], entry: str) -> str:
        trusted = [n for n in nodes if n.reputation >= self.trust_floor]
        if not trusted:
            raise ValueError("no trusted node to choose from")
        # A node with no latency history yet (or one claiming zero) is taken to be typical, not
        # the fastest: otherwise every new node, and every liar, would draw all traffic first.
        known = sorted(n.recent_latency_s for n in trusted if n.recent_latency_s > 0)
        typical = known[len(known) // 2] if known else 0.0
        factors = {
            n.node_id: load_factor(n if n.recent_latency_s > 0 else replace(n, recent_latency_s=typical))
            for n in trusted
        }
        ordered = sorted(factors.values())
        # In a small swarm the percentile can exclude a warm node whose load factor is barely
        # above the rest (one request in flight), so near-best (within `near_best`) also counts.
        cutoff = max(_percentile(ordered, self.percentile), self.near_best * ordered[0])
        matches = self.tree.match(prompt_ids)
        eligible = [
            (depth, -factors[node]) for node, depth in matches.items() if node in factors and factors[node] <= cutoff
        ]
        if eligible:
            best = max(eligible)
            return next(n for n, d in matches.items() if n in factors and (d, -factors[n]) == best)
        lowest = min(factors.values())
        # Ties (idle nodes alike) are broken at random, or the first listed would take them all.
        return self._rng.choice([node for node, factor in factors.items() if factor <= lowest * (1 + 1e-9)])

    def served(self, node_id: str, prompt_ids: Sequence[int], now: float) -> None:
        self.tree.insert(node_id, prompt_ids, now)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks of a sorted, non-empty sequence."""
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class CentralOraclePolicy(OverlayPolicy):
    """The centralized scheduler both papers compare against: the same rule, but given every
    node's true state at every decision (the caller passes true states, not gossiped ones)."""

    name = "central-oracle"
