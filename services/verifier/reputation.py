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

__all__ = ["INITIAL", "TRUST_THRESHOLD", "ProviderStanding", "ReputationBook"]

INITIAL = 0.6
TRUST_THRESHOLD = 0.3
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
