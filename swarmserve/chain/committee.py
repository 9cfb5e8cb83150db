"""Who validates the next epoch: the committee rule, applied by every replica at the last block of
each epoch to the state after that block, so every replica chooses the same committee.

Candidates are nodes that offered to validate (a ``ValidatorCandidacy`` transaction naming a
consensus address; the genesis validators are candidates from the start). The rule:

- a candidate counts only if its account has at least ``validator_min_stake`` credits bonded
  (stake that is unbonding does not count: it is on its way out);
- an account fills one seat however many of its nodes offer (splitting stake across keys or
  nodes buys no extra votes): its candidate with the lowest key;
- seats go to the accounts with the most bonded stake (ties: the lower account key), at most
  ``committee_size`` of them;
- if fewer than ``min_committee`` accounts qualify, the committee stays as it is: the chain
  never hands itself to a committee too small to survive one faulty validator.

Simplex gives each validator one equal vote, so stake buys a seat, not a bigger vote: an account
with a third of the stake holds one seat among up to ``committee_size``, and taking over the
chain means holding more than a third of the seats, i.e. out-staking that many accounts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["Candidate", "choose_committee", "valid_consensus_address"]


@dataclass(frozen=True)
class Candidate:
    key: bytes  # the node's identity key (what it signs votes with)
    address: str  # its consensus address
    account: bytes  # the account whose bonded stake backs it
    stake: int  # that account's bonded credits


def choose_committee(
    candidates: list[Candidate],
    current: list[tuple[bytes, str]],
    *,
    size: int,
    min_stake: int,
    min_committee: int,
) -> list[tuple[bytes, str]]:
    """The next epoch's committee, as (key, address) in key order."""
    seat: dict[bytes, Candidate] = {}
    for candidate in candidates:
        if candidate.stake < min_stake:
            continue
        held = seat.get(candidate.account)
        if held is None or candidate.key < held.key:
            seat[candidate.account] = candidate
    ranked = sorted(seat.values(), key=lambda c: (-c.stake, c.account))[:size]
    if len(ranked) < min_committee:
        return sorted(current)
    return sorted((c.key, c.address) for c in ranked)


def valid_consensus_address(address: str) -> bool:
    """IP:port with an IP literal (``[v6]:port`` for IPv6) and a port in 1..65535, as the
    consensus node parses it: a name would need a resolver, which differs between replicas."""
    host, sep, port = address.rpartition(":")
    if not sep or len(address) > 64 or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
