"""Reputation read from the ledger's chain (swarmserve/trust), on blocks built here: a FAIL counts
only once decided (not while pending, never if overturned), a decided FAIL convicts for good so
that later PASS verdicts cannot wash it out (the review's attack: one PASS brought a proven
cheater back to 0.648, trusted), and reading is incremental: each verdict counts once however
often the book is read."""

from __future__ import annotations

from swarmserve.chain.evidence import verdict_id
from swarmserve.trust import INITIAL, ChainReputation
from swarmserve.v1 import chain_pb2
from tests.test_chain_verdicts import FAIL, PASS, PROVIDER, WINDOW, Verdicts, served


def test_a_decided_fail_convicts_for_good_and_pending_or_overturned_ones_do_not_count() -> None:
    v = Verdicts()
    trust = ChainReputation(v.chain.state)
    # A FAIL in its appeal window: nothing yet.
    first = served("r1")
    v.chain.block([v.verdict(v.assigned(first)[0], first, FAIL)])
    assert trust.standing(PROVIDER.public_key).score == INITIAL and trust.standing(PROVIDER.public_key).trusted
    # Overturned on appeal: never counts against the provider.
    identifier = verdict_id(first.receipt)
    v.chain.block([v.submit(PROVIDER, appeal=chain_pb2.AppealVerdict(verdict_id=identifier))])
    jurors = [v.identities[j] for j in v.chain.state.jurors(identifier)]
    v.chain.block([v.submit(j, appeal_vote=chain_pb2.AppealVote(verdict_id=identifier, uphold=False)) for j in jurors])
    v.chain.until(v.chain.height + WINDOW + 1)
    assert v.chain.state.verdict(identifier).status == "overturned"  # type: ignore[union-attr]
    assert trust.standing(PROVIDER.public_key).verdicts == 0
    # Passes count, once each, however often the book is read.
    for request in ("r2", "r3"):
        evidence = served(request)
        v.chain.block([v.verdict(v.assigned(evidence)[0], evidence, PASS)])
        trust.book()
    assert trust.standing(PROVIDER.public_key).verdicts == 2
    # A decided FAIL: convicted; passes afterwards raise the score but never the trust.
    caught = served("r4")
    v.chain.block([v.verdict(v.assigned(caught)[0], caught, FAIL)])
    v.chain.until(v.chain.height + WINDOW + 1)
    assert trust.standing(PROVIDER.public_key).convicted
    for request in ("r5", "r6", "r7"):
        evidence = served(request)
        v.chain.block([v.verdict(v.assigned(evidence)[0], evidence, PASS)])
    standing = trust.standing(PROVIDER.public_key)
    assert standing.verdicts == 6 and standing.failures == 1
    assert standing.score > 0.6 and not standing.trusted
    # Another replica reading the chain from scratch agrees.
    fresh = ChainReputation(v.chain.replicas[1]).standing(PROVIDER.public_key)
    assert (fresh.score, fresh.verdicts, fresh.convicted) == (standing.score, standing.verdicts, standing.convicted)
