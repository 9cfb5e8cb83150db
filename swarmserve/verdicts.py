"""Signed verdicts: made by verifiers, judges and duel organisers, checked by anyone who reads
them (routers computing reputation, ledger replicas accepting a verdict record).

A duel result carries the judges' signed votes; :func:`tally_duel` is the one place that decides
whether those votes support the result, for the node that runs the duel and for every replica
that records it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import verifier_pb2

__all__ = [
    "DuelTally",
    "VerdictError",
    "decide_duel",
    "open_verdict",
    "sign_verdict",
    "slashed_account",
    "tally_duel",
]

_PASS = verifier_pb2.VERDICT_OUTCOME_PASS
_INCONCLUSIVE = verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE


class VerdictError(ValueError):
    """A verdict that does not check out; the message says why."""


def sign_verdict(identity: native.Identity, verdict: verifier_pb2.Verdict) -> verifier_pb2.SignedVerdict:
    if not verdict.issued_unix_ms:
        verdict.issued_unix_ms = int(time.time() * 1000)
    body = verdict.SerializeToString(deterministic=True)
    return verifier_pb2.SignedVerdict(verdict=body, verifier_key=identity.public_key, signature=identity.sign(body))


def open_verdict(signed: verifier_pb2.SignedVerdict) -> verifier_pb2.Verdict:
    """The verdict body, after checking the signer's signature and the body's shape."""
    try:
        native.verify_signature(signed.verifier_key, signed.verdict, signed.signature)
    except native.CryptoError as error:
        raise VerdictError(f"verdict signature is invalid: {error}") from None
    try:
        verdict = verifier_pb2.Verdict.FromString(signed.verdict)
    except DecodeError as error:
        raise VerdictError(f"verdict body is not a Verdict message: {error}") from None
    if (
        verdict.kind == verifier_pb2.VERDICT_KIND_UNSPECIFIED
        or verdict.outcome == verifier_pb2.VERDICT_OUTCOME_UNSPECIFIED
    ):
        raise VerdictError("verdict has no kind or no outcome")
    if not 0.0 <= verdict.score <= 1.0:
        raise VerdictError(f"verdict score {verdict.score} is outside [0, 1]")
    if len(verdict.provider_key) != 32:
        raise VerdictError("verdict names no provider key")
    if verdict.kind != verifier_pb2.VERDICT_KIND_CHECK and len(verdict.opponent_key) != 32:
        raise VerdictError("a duel verdict names no opponent key")
    return verdict


@dataclass(frozen=True)
class DuelTally:
    winner: bytes
    loser: bytes
    judges_agreeing: tuple[bytes, ...]  # voted for the winner
    judges_dissenting: tuple[bytes, ...]  # voted for the loser
    judges_undecided: tuple[bytes, ...]  # voted inconclusive


def tally_duel(result: verifier_pb2.Verdict) -> DuelTally:
    """Checks a duel result against its votes: each vote signed by a judge that is neither party
    (each judge once), about this duel and these two providers, and the winner named by more
    votes than the loser. Raises :class:`VerdictError` otherwise."""
    if result.kind != verifier_pb2.VERDICT_KIND_DUEL_RESULT or result.outcome != _PASS:
        raise VerdictError("not a decided duel result")
    parties = {result.provider_key, result.opponent_key}
    if len(parties) != 2:
        raise VerdictError("a duel needs two different providers")
    agreeing: list[bytes] = []
    dissenting: list[bytes] = []
    undecided: list[bytes] = []
    for signed in result.votes:
        vote = open_verdict(signed)
        judge = signed.verifier_key
        if vote.kind != verifier_pb2.VERDICT_KIND_DUEL or vote.subject_id != result.subject_id:
            raise VerdictError(f"vote by {judge.hex()[:16]} is not about duel {result.subject_id!r}")
        if {vote.provider_key, vote.opponent_key} != parties:
            raise VerdictError(f"vote by {judge.hex()[:16]} is about other providers")
        if judge in parties:
            raise VerdictError(f"judge {judge.hex()[:16]} is a party to the duel")
        if judge in agreeing + dissenting + undecided:
            raise VerdictError(f"judge {judge.hex()[:16]} voted twice")
        if vote.outcome == _INCONCLUSIVE:
            undecided.append(judge)
        elif vote.provider_key == result.provider_key:
            agreeing.append(judge)
        else:
            dissenting.append(judge)
    if len(agreeing) <= len(dissenting):
        raise VerdictError(
            f"the votes do not make {result.provider_key.hex()[:16]} the winner "
            f"({len(agreeing)} for, {len(dissenting)} against)"
        )
    return DuelTally(result.provider_key, result.opponent_key, tuple(agreeing), tuple(dissenting), tuple(undecided))


def decide_duel(duel_id: str, votes: Sequence[verifier_pb2.SignedVerdict]) -> verifier_pb2.Verdict | None:
    """The duel result these votes make (unsigned; the organiser adds its method and signs it):
    the side more decided votes prefer, with the share of decided votes it got as the score; None
    on a tie or without a decided vote. Checked with :func:`tally_duel`, the rule replicas apply."""
    decided = [vote for vote in map(open_verdict, votes) if vote.outcome == _PASS]
    ranked = Counter(vote.provider_key for vote in decided).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    winner, won = ranked[0]
    result = verifier_pb2.Verdict(
        kind=verifier_pb2.VERDICT_KIND_DUEL_RESULT,
        subject_id=duel_id,
        provider_key=winner,
        opponent_key=next(vote.opponent_key for vote in decided if vote.provider_key == winner),
        outcome=_PASS,
        score=won / len(decided),
        votes=votes,
    )
    tally_duel(result)
    return result


def slashed_account(verdict: verifier_pb2.Verdict) -> bytes:
    """Whose stake a verdict record slashes: the checked provider, or a duel's loser."""
    return verdict.opponent_key if verdict.kind == verifier_pb2.VERDICT_KIND_DUEL_RESULT else verdict.provider_key
