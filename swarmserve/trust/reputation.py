"""Reputation of providers, from verdicts (PlanetServe's rule, with our verdict scores).

Each conclusive verdict gives the nodes it is about a score C in [0, 1]:

- a re-execution check: 0 for a failed check, the share of plausible positions for a passed one
  (1.0 for a perfect replay);
- a duel result: 1.0 for the winner and 0.5 for the loser (losing a close duel to an honest peer
  is not cheating; the lost stake is the penalty), and for each judge 1.0 if it voted with the
  majority, 0 if it voted against it (a judge that lies, or always votes for one side or one
  position, is in the minority whenever the honest majority disagrees with it). Undecided votes
  score nothing.

Then

    R <- 0.4 R + 0.6 C, and R <- R / 2 when more than 20% of the last 5 scores are below 0.4

and, beyond PlanetServe, R <- R / 2 at once for a failed check: it is proof of cheating (the
check's false-positive rate is below 1e-4 by construction; 0 in 1,000 honest requests measured),
so a provider that fails one check in five does not stay trusted by passing the others.

A node without verdicts starts at 0.6. Below 0.3 a node is untrusted: routers send it no
traffic and pick it as no judge. A decided FAIL convicts a provider for good: no number of PASS
verdicts afterwards makes it trusted again (a cheater would otherwise wash a proven fault out
with checks of honest work). An operator caught cheating starts over with a new identity,
which holds nothing: credits come only from the genesis or from work paid for.

The verdicts come from the ledger's chain (:class:`ChainReputation`): checks recorded by the
verifiers the chain drew, FAILs once decided (after the appeal window), duels whose votes the
chain rechecked. Every node reading the same chain computes the same reputation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swarmserve.v1 import verifier_pb2
from swarmserve.verdicts import tally_duel

if TYPE_CHECKING:
    from swarmserve.chain.state import ChainState

__all__ = [
    "INITIAL",
    "TRUST_THRESHOLD",
    "ChainReputation",
    "ProviderStanding",
    "ReputationBook",
    "verdict_scores",
]

TRUST_THRESHOLD = 0.3  # reputation below which a provider gets no traffic (PlanetServe's)

INITIAL = 0.6
KEEP = 0.4  # weight of the old reputation
WINDOW = 5
LOW_SCORE = 0.4
ABNORMAL_SHARE = 0.2
PENALTY = 0.5


@dataclass
class ProviderStanding:
    score: float = INITIAL
    verdicts: int = 0
    failures: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    convicted: bool = False  # a FAIL was decided against it

    @property
    def trusted(self) -> bool:
        return self.score >= TRUST_THRESHOLD and not self.convicted


class ReputationBook:
    """Reputation per provider identity key, updated verdict by verdict."""

    def __init__(self) -> None:
        self._standings: dict[bytes, ProviderStanding] = {}

    def record(self, provider_key: bytes, score: float, *, failed: bool) -> ProviderStanding:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"verdict score must be in [0, 1], got {score}")
        standing = self._standings.setdefault(provider_key, ProviderStanding())
        standing.verdicts += 1
        standing.failures += failed
        standing.recent.append(score)
        standing.score = KEEP * standing.score + (1 - KEEP) * score
        if sum(s < LOW_SCORE for s in standing.recent) > ABNORMAL_SHARE * WINDOW:
            standing.score *= PENALTY
        if failed:
            standing.score *= PENALTY
            standing.convicted = True
        return standing

    def standing(self, provider_key: bytes) -> ProviderStanding:
        return self._standings.get(provider_key, ProviderStanding())

    def score(self, provider_key: bytes) -> float:
        return self.standing(provider_key).score

    def all(self) -> dict[bytes, ProviderStanding]:
        return dict(self._standings)


def verdict_scores(verdict: verifier_pb2.Verdict) -> list[tuple[bytes, float, bool]]:
    """(node key, C, failed check) for each node a verdict is about (see the module docstring);
    nothing for an inconclusive check or a lone judge's vote."""
    if verdict.kind == verifier_pb2.VERDICT_KIND_CHECK:
        if verdict.outcome == verifier_pb2.VERDICT_OUTCOME_PASS:
            return [(verdict.provider_key, verdict.score, False)]
        if verdict.outcome == verifier_pb2.VERDICT_OUTCOME_FAIL:
            return [(verdict.provider_key, 0.0, True)]
        return []
    if verdict.kind == verifier_pb2.VERDICT_KIND_DUEL_RESULT:
        tally = tally_duel(verdict)
        return [
            (tally.winner, 1.0, False),
            (tally.loser, 0.5, False),
            *((judge, 1.0, False) for judge in tally.judges_agreeing),
            *((judge, 0.0, False) for judge in tally.judges_dissenting),  # no proof: an outvoted honest judge
        ]
    return []


class ChainReputation:
    """Reputation from a chain replica, read incrementally: each call applies only the verdicts
    and duels decided since the last one, in the chain's order. Without a chain (a swarm that
    runs none) every provider stands at the initial score."""

    def __init__(self, state: ChainState | None) -> None:
        self._state = state
        self._height = 0
        self._book = ReputationBook()

    def book(self) -> ReputationBook:
        state = self._state
        if state is not None and state.height > self._height:
            height, events = state.reputation_events(self._height)
            for event in events:
                if isinstance(event, verifier_pb2.Verdict):
                    for key, score, failed in verdict_scores(event):
                        self._book.record(key, score, failed=failed)
                else:
                    provider, score, failed = event
                    self._book.record(provider, 0.0 if failed else score, failed=failed)
            self._height = height
        return self._book

    def standing(self, provider_key: bytes) -> ProviderStanding:
        return self.book().standing(provider_key)
