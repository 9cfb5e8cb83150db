"""Cheques: how a router pays providers without a transaction per request.

A cheque is the payer's signed statement of everything it owes one payee so far (cumulative),
handed to the payee off-chain as work is served; each new one replaces the last, so losing or
replaying one costs nothing. The payee settles the latest on the chain at most once per epoch
(``SettleCheques``, many in one transaction); the chain pays the part not settled before. A
cheque names no request, prompt or receipt: the chain learns only that a payer paid a payee so
much per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import chain_pb2

__all__ = ["ChequeError", "OpenCheque", "open_cheque", "sign_cheque"]


class ChequeError(ValueError):
    """A cheque that is malformed, badly signed or for another chain."""


@dataclass(frozen=True)
class OpenCheque:
    payer: bytes
    payee: bytes
    cumulative: int
    signed: chain_pb2.SignedCheque


def sign_cheque(identity: native.Identity, chain_id: bytes, payee: bytes, cumulative: int) -> chain_pb2.SignedCheque:
    body = chain_pb2.Cheque(
        chain_id=chain_id, payer_key=identity.public_key, payee_key=payee, cumulative_credits=cumulative
    ).SerializeToString()
    return chain_pb2.SignedCheque(cheque=body, signature=identity.sign(body))


MAX_CHEQUE_CREDITS = 2**63 - 1


def open_cheque(signed: chain_pb2.SignedCheque, chain_id: bytes) -> OpenCheque:
    """The cheque's terms, after checking its shape, chain and the payer's signature."""
    try:
        cheque = chain_pb2.Cheque.FromString(signed.cheque)
    except DecodeError as error:
        raise ChequeError(f"malformed cheque: {error}") from error
    if cheque.chain_id != chain_id:
        raise ChequeError("the cheque is for another chain")
    if len(cheque.payer_key) != 32 or len(cheque.payee_key) != 32:
        raise ChequeError("malformed cheque: payer and payee keys are 32 bytes")
    if cheque.payer_key == cheque.payee_key:
        raise ChequeError("a cheque to oneself pays nothing")
    if cheque.cumulative_credits < 1:
        raise ChequeError("the cheque is for no credits")
    if cheque.cumulative_credits > MAX_CHEQUE_CREDITS:  # no account can hold more; storage is signed 64-bit
        raise ChequeError(f"the cheque is for more than {MAX_CHEQUE_CREDITS} credits")
    try:
        native.verify_signature(cheque.payer_key, signed.cheque, signed.signature)
    except native.CryptoError as error:
        raise ChequeError(f"bad cheque signature: {error}") from error
    return OpenCheque(cheque.payer_key, cheque.payee_key, cheque.cumulative_credits, signed)
