"""Dispatch: which inference node should serve a request. One implementation of each policy,
used by the router, by inference nodes offloading work, and by the overlay simulation
(`bench/overlay_sim.py`), so that what is simulated is what runs.

- :class:`PrefixTree`: PlanetServe's hash-radix tree of prompt-token chunks per node.
- :class:`NodeState`: what the dispatcher knows of a node (from gossip, or the truth for the oracle);
  :func:`reported_state` reads one from a node's load report.
- Paths: :func:`choose_path` / :class:`PathChooser` draw a circuit's relays by stake with no two
  hops of one operator or network (``paths.py``; also used by ``bench/adversary_sim.py``).
- Policies: :class:`OverlayPolicy` (prefix affinity + load factor, ours), :class:`RoundRobinPolicy`,
  :class:`RandomPolicy`, :class:`LocalOnlyPolicy`, and :class:`CentralOraclePolicy`.
"""

from swarmserve.dispatch.paths import Hop, NoDiversePath, PathChooser, choose_path, network_of
from swarmserve.dispatch.policies import (
    TRUST_THRESHOLD,
    CentralOraclePolicy,
    LocalOnlyPolicy,
    NodeState,
    OverlayPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
    load_factor,
    reported_state,
)
from swarmserve.dispatch.prefix_tree import CHUNK_TOKENS, PrefixTree

__all__ = [
    "CHUNK_TOKENS",
    "TRUST_THRESHOLD",
    "CentralOraclePolicy",
    "Hop",
    "LocalOnlyPolicy",
    "NoDiversePath",
    "NodeState",
    "OverlayPolicy",
    "PathChooser",
    "Policy",
    "PrefixTree",
    "RandomPolicy",
    "RoundRobinPolicy",
    "choose_path",
    "load_factor",
    "network_of",
    "reported_state",
]
