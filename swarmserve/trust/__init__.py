"""Trust, in one place: providers' reputation from the verdicts and duels the ledger's chain
recorded, read by router dispatch, duels, offload and the verifier alike."""

from swarmserve.trust.reputation import (
    INITIAL,
    TRUST_THRESHOLD,
    ChainReputation,
    ProviderStanding,
    ReputationBook,
    verdict_scores,
)

__all__ = ["INITIAL", "TRUST_THRESHOLD", "ChainReputation", "ProviderStanding", "ReputationBook", "verdict_scores"]
