"""Which relays carry a circuit: drawn by stake, never two hops of one operator or one network.

One implementation, used by the router and by the adversary simulation
(``bench/adversary_sim.py``), so that what is simulated is what runs.

Rules (a path is the relays plus the exit that ends it):

- **Stake.** Each relay is drawn with probability proportional to its operator account's bonded
  stake (read from the ledger's chain), without replacement. A Sybil's thousand descriptors share
  its stake: running more relays buys no more of the paths. Relays with no stake are drawn only
  when fewer than ``hops`` staked relays can make a diverse path (a swarm without a ledger, or
  one starting), and then uniformly.
- **Diversity.** No two hops of one path (the exit included) belong to one operator (ledger
  account; an identity key without a ledger) or sit in one network (an IPv4 /16, an IPv6 /32,
  as Tor's EnforceDistinctSubnets). Loopback addresses and host names are exempt from the
  network rule (a swarm on one machine is one network, and a name says nothing of where it is).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from swarmserve.config import host_of

__all__ = ["Hop", "NoDiversePath", "PathChooser", "choose_path", "network_of"]


class NoDiversePath(Exception):
    """Fewer relays than hops can make a path under the diversity rule."""


def network_of(address: str) -> str | None:
    """The network a ``host:port`` address counts as for diversity (None: exempt)."""
    try:
        ip = ipaddress.ip_address(host_of(address))
    except ValueError:
        return None  # a host name
    if ip.is_loopback:
        return None
    prefix = 16 if ip.version == 4 else 32
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass(frozen=True)
class Hop:
    """A relay or exit as path choice sees it."""

    node_id: str
    operator: bytes  # ledger account (or identity key)
    network: str | None  # network_of(address)
    stake: int  # the operator account's bonded credits


def _compatible(hop: Hop, taken: Sequence[Hop]) -> bool:
    return all(
        hop.node_id != t.node_id and hop.operator != t.operator and (hop.network is None or hop.network != t.network)
        for t in taken
    )


class PathChooser:
    """Chooses paths among one set of live relays (built once per set: the stake index is
    computed here, so that each draw costs O(log n))."""

    def __init__(self, candidates: Sequence[Hop]) -> None:
        self._all = list(candidates)
        self._staked = [c for c in self._all if c.stake > 0]
        self._cumulative = list(accumulate(c.stake for c in self._staked))

    def choose(self, hops: int, exit_: Hop, rng: random.Random) -> list[Hop]:
        """``hops`` relays for a circuit ending at ``exit_`` (see the module's rules). Raises
        :class:`NoDiversePath` when no diverse path of that length is found."""
        for by_stake in (True, False):
            # A greedy draw can paint itself into a corner (its first picks exclude every relay
            # left); a few more draws find a path whenever one is likely to exist.
            for _ in range(8):
                path = self._draw(hops, exit_, rng, by_stake)
                if path is not None:
                    return path
        raise NoDiversePath(
            f"{hops} hops asked for, but the {len(self._all)} live relays known cannot make a path with "
            "no two hops of one operator or one network"
        )

    def _draw(self, hops: int, exit_: Hop, rng: random.Random, by_stake: bool) -> list[Hop] | None:
        path: list[Hop] = []
        for _ in range(hops):
            hop = self._pick([exit_, *path], rng, by_stake)
            if hop is None:
                return None
            path.append(hop)
        return path

    def _pick(self, taken: Sequence[Hop], rng: random.Random, by_stake: bool) -> Hop | None:
        pool = self._staked if by_stake else self._all
        if not pool:
            return None
        # Drawing from every candidate and redrawing the incompatible ones is drawing from the
        # compatible ones with the same weights; after a few misses, filter instead.
        for _ in range(16):
            hop = rng.choices(pool, cum_weights=self._cumulative)[0] if by_stake else rng.choice(pool)
            if _compatible(hop, taken):
                return hop
        compatible = [c for c in pool if _compatible(c, taken)]
        if not compatible:
            return None
        return rng.choices(compatible, [c.stake for c in compatible] if by_stake else None)[0]


def choose_path(candidates: Sequence[Hop], hops: int, exit_: Hop, rng: random.Random) -> list[Hop]:
    """One path among ``candidates`` (see :class:`PathChooser`)."""
    return PathChooser(candidates).choose(hops, exit_, rng)
