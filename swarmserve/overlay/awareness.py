"""Lifeguard's Local Health Multiplier (Dadgar, Phillips, Currey 2018; memberlist's
``awareness.go``): a node that is itself slow is the likeliest cause of the failures it sees, so
it waits longer before it concludes anything about others.

The score rises when this node shows signs of being the slow one (its probe went unanswered and
so did the helpers it asked, it had to refute a suspicion about itself, its event loop ran late)
and falls by one with each probe answered in time. The caller multiplies its probe timeout, its
protocol period and the suspicion timeouts it applies by :attr:`Awareness.multiplier`.

Invariants: ``0 <= score <= max_multiplier - 1``, so ``1 <= multiplier <= max_multiplier``; with
``max_multiplier`` 1 the score stays 0 and nothing is scaled (Lifeguard off). Pure: no clock, no
I/O, no event loop; the caller reports what happened.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError(f"max_multiplier must be at least 1, not {max_multiplier}")
        self.max_multiplier = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """0 (healthy) to ``max_multiplier - 1`` (as slow as it counts)."""
        return self._score

    @property
    def multiplier(self) -> int:
        """What timeouts and the protocol period are multiplied by: ``score + 1``."""
        return self._score + 1

    def apply(self, delta: int) -> int:
        """Adds ``delta`` (positive: a sign of ill health; negative: of health), clamped to the
        range; returns the change actually made (0 once railed at either end)."""
        before = self._score
        self._score = min(max(before + delta, 0), self.max_multiplier - 1)
        return self._score - before

    def scale(self, seconds: float) -> float:
        """``seconds`` stretched by the current multiplier."""
        return seconds * self.multiplier
