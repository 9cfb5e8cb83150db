"""Signed verdicts: made by verifiers and judges, checked by anyone who reads them (routers
computing reputation, ledger replicas accepting a verdict record)."""

from __future__ import annotations

import time

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import verifier_pb2

__all__ = ["VerdictError", "open_verdict", "sign_verdict"]


class VerdictError(ValueError):
    """A verdict that does not check out; the message says why."""


def sign_verdict(identity: native.Identity, verdict: verifier_pb2.Verdict) -> verifier_pb2.SignedVerdict:
    if not verdict.issued_unix_ms:
        verdict.issued_unix_ms = int(time.time() * 1000)
    body = verdict.SerializeToString(deterministic=True)
    return verifier_pb2.SignedVerdict(verdict=body, verifier_key=identity.public_key, signature=identity.sign(body))


def open_verdict(signed: verifier_pb2.SignedVerdict) -> verifier_pb2.Verdict:
    """The verdict body, after checking the verifier's signature over it."""
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
    return verdict
