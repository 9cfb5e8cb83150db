"""Reputation of providers, from verdicts (PlanetServe's rule, with our verdict scores).

Each conclusive verdict about a provider gives a score C in [0, 1]: 0 for a failed check, the
share of plausible positions for a passed one (1.0 for a perfect replay), 1.0 for a won duel and
0.5 for a lost one (losing a close duel to an honest peer is not cheating). Then

    R <- 0.4 R + 0.6 C, and R <- R / 2 when more than 20% of the last 5 scores are below 0.4

starting from 0.6 for a provider without verdicts. Below 0.3 a provider is untrusted: routers
send it no traffic (it keeps receiving challenges, so it can earn its way back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from swarmserve.dispatch import TRUST_THRESHOLD
from swarmserve.ledger import LedgerReplica
from swarmserve.v1 import verifier_pb2

__all__ = ["INITIAL", "LedgerReputation", "ProviderStanding", "ReputationBook", "verdict_score"]

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

    @property
    def trusted(self) -> bool:
        return self.score >= TRUST_THRESHOLD


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
        return standing

    def standing(self, provider_key: bytes) -> ProviderStanding:
        return self._standings.get(provider_key, ProviderStanding())

    def score(self, provider_key: bytes) -> float:
        return self.standing(provider_key).score

    def all(self) -> dict[bytes, ProviderStanding]:
        return dict(self._standings)


def verdict_score(verdict: verifier_pb2.Verdict) -> float | None:
    """C for one verdict (see the module docstring); None for an inconclusive one."""
    if verdict.outcome == verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE:
        return None
    if verdict.kind == verifier_pb2.VERDICT_KIND_DUEL:
        return 1.0 if verdict.outcome == verifier_pb2.VERDICT_OUTCOME_PASS else 0.5
    return verdict.score if verdict.outcome == verifier_pb2.VERDICT_OUTCOME_PASS else 0.0


class LedgerReputation:
    """Reputation as any node computes it: the verdicts in its own ledger replica, replayed in the
    ledger's agreed order (so every replica holding the same entries agrees)."""

    def __init__(self, replica: LedgerReplica) -> None:
        self._replica = replica
        self._counted = -1
        self._book = ReputationBook()

    def book(self) -> ReputationBook:
        count = self._replica.entry_count()
        if count != self._counted:
            book = ReputationBook()
            for verdict in self._replica.verdicts():
                score = verdict_score(verdict)
                if score is not None:
                    book.record(
                        verdict.provider_key, score, failed=verdict.outcome == verifier_pb2.VERDICT_OUTCOME_FAIL
                    )
            self._book, self._counted = book, count
        return self._book

    def score(self, provider_key: bytes) -> float:
        return self.book().score(provider_key)
