"""Signed ledger transactions: what an account asks the chain to do (see ``chain.proto``)."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from swarmserve import native
from swarmserve.v1 import chain_pb2

__all__ = ["Transaction", "TransactionError", "decode_transaction", "sign_transaction"]

KEY_BYTES = 32


class TransactionError(ValueError):
    """A transaction that is void everywhere: malformed, badly signed, or for another chain."""


@dataclass(frozen=True)
class Transaction:
    raw: bytes  # the SignedTransaction, byte for byte as it travels and sits in blocks
    body: chain_pb2.TransactionBody

    @property
    def account(self) -> bytes:
        return self.body.account_key

    @property
    def nonce(self) -> int:
        return self.body.nonce

    @property
    def kind(self) -> str | None:
        return self.body.WhichOneof("kind")


def sign_transaction(identity: native.Identity, chain_id: bytes, nonce: int, **action: Message) -> bytes:
    """One transaction of ``identity``'s account, serialized for submission; ``action`` is one
    field of ``TransactionBody.kind`` (``transfer=TransferCredits(...)``, ``settle=...``)."""
    if len(action) != 1:
        raise TransactionError("a transaction does exactly one thing")
    try:
        body = chain_pb2.TransactionBody(chain_id=chain_id, account_key=identity.public_key, nonce=nonce, **action)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise TransactionError(f"not a transaction: {error}") from error
    serialized = body.SerializeToString()
    return chain_pb2.SignedTransaction(body=serialized, signature=identity.sign(serialized)).SerializeToString()


def decode_transaction(raw: bytes, chain_id: bytes) -> Transaction:
    """Checks what makes a transaction void whatever the ledger's state: its shape, its
    signature, its chain."""
    try:
        signed = chain_pb2.SignedTransaction.FromString(raw)
        body = chain_pb2.TransactionBody.FromString(signed.body)
    except DecodeError as error:
        raise TransactionError(f"malformed transaction: {error}") from error
    if len(body.account_key) != KEY_BYTES:
        raise TransactionError("malformed transaction: account_key must be 32 bytes")
    if body.chain_id != chain_id:
        raise TransactionError("the transaction is for another chain")
    if body.nonce < 1:
        raise TransactionError("nonces start at 1")
    if body.WhichOneof("kind") is None:
        raise TransactionError("the transaction does nothing")
    try:
        native.verify_signature(body.account_key, signed.body, signed.signature)
    except (native.SignatureError, native.InvalidKeyError) as error:
        raise TransactionError(f"bad signature: {error}") from error
    return Transaction(raw, body)
