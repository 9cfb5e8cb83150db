"""Lifeguard's suspicion timer (Dadgar et al., 2018, as memberlist runs it): a suspicion starts
long and shortens with each independent confirmation, so one member that cannot reach another
(or lies about it) cannot get it declared dead fast, while a member that everyone finds dead is
declared dead as fast as before.

    timeout = max(min_s, max_s - (max_s - min_s) * log(C + 1) / log(K + 1))

C counts distinct claimants after the first; K confirmations are expected (0 in swarms too
small to expect any: then the timeout is min_s at once). Claimants are authenticated by their
signature on the claim (``packets.py``); only members count.

The timeout is then stretched by the highest local health multiplier (``awareness.py``) this
node had while the suspicion ran: a node that was itself slow gives the suspect as much more
time as it gave itself, and never less than before.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "expected_confirmations"]


def expected_confirmations(suspicion_mult: float, members: int) -> int:
    """memberlist's K: suspicion_mult - 2, or 0 when fewer members than that could confirm."""
    k = max(0, int(suspicion_mult) - 2)
    return 0 if members - 2 < k else k


class Suspicion:
    def __init__(self, first_claimant: bytes, expected: int, min_s: float, max_s: float, started: float) -> None:
        self._claimants = {first_claimant}
        self._expected = expected
        self._min_s = min_s
        self._max_s = max(min_s, max_s)
        self._stretch = 1.0
        self.started = started

    @property
    def confirmations(self) -> int:
        return len(self._claimants) - 1

    def confirm(self, claimant: bytes) -> bool:
        """Counts ``claimant``'s claim; True if it is a new one."""
        if claimant in self._claimants:
            return False
        self._claimants.add(claimant)
        return True

    def stretch(self, factor: float) -> None:
        """Lengthens the timeout ``factor`` times (this node's health multiplier now); only the
        highest factor given counts, so a node that recovers does not cut a suspicion short."""
        self._stretch = max(self._stretch, factor)

    def timeout_s(self) -> float:
        if self._expected <= 0:
            return self._min_s * self._stretch
        fraction = math.log(min(self.confirmations, self._expected) + 1) / math.log(self._expected + 1)
        return max(self._min_s, self._max_s - (self._max_s - self._min_s) * fraction) * self._stretch

    def expired(self, now: float) -> bool:
        return now - self.started >= self.timeout_s()
