"""The chain's verifiable lottery: which accounts may judge a subject (verify a receipt, sit on an
appeal committee, judge a duel).

A draw is a pure function of a seed that nobody chose (the digest of an epoch's first block),
the subject (e.g. the digest of a receipt), and the staked accounts: anyone with the chain's
state recomputes it and gets the same answer, so a verifier cannot pick itself, and a verdict
from an account that was not drawn is refused. Accounts are drawn without replacement with
probability proportional to their bonded stake, in integer arithmetic only (the same on every
machine): many identities with no stake are never drawn.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from blake3 import blake3

__all__ = ["draw"]


def draw(
    seed: bytes,
    subject: bytes,
    stakes: Mapping[bytes, int],
    count: int,
    *,
    excluded: Collection[bytes] = (),
) -> list[bytes]:
    """Up to ``count`` accounts of ``stakes`` (account -> bonded credits, all positive), not in
    ``excluded``, drawn one after another in proportion to stake. Deterministic."""
    pool = sorted((account, stake) for account, stake in stakes.items() if stake > 0 and account not in excluded)
    drawn: list[bytes] = []
    for turn in range(min(count, len(pool))):
        total = sum(stake for _, stake in pool)
        ticket = int.from_bytes(blake3(seed + subject + turn.to_bytes(4, "big")).digest(), "big") % total
        for index, (account, stake) in enumerate(pool):
            if ticket < stake:
                drawn.append(account)
                del pool[index]
                break
            ticket -= stake
    return drawn
