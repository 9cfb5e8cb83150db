"""Ledger entries: building and signing them, decoding and checking what peers send.

Each author's entries form a chain (sequence 1, 2, ...; each names the previous entry's hash,
``native.ledger_entry_hash``), and only the author can extend it: the body is signed with the
author's identity key. Sequence 1 of every chain is the author's joining grant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import ledger_pb2

__all__ = [
    "GENESIS_HASH",
    "GRANT_CREDITS",
    "MAX_FUTURE_SKEW_MS",
    "Entry",
    "LedgerRejection",
    "decode_entry",
    "sign_entry",
]

GENESIS_HASH = bytes(32)
GRANT_CREDITS = 100  # every new identity's grant: a few requests' worth, no stake
MAX_FUTURE_SKEW_MS = 60_000


class LedgerRejection(ValueError):
    """An entry no replica accepts; the message names the entry and the rule it breaks."""


@dataclass(frozen=True)
class Entry:
    """A decoded entry whose author signature checked out."""

    raw: ledger_pb2.LedgerEntry
    body: ledger_pb2.EntryBody
    hash: bytes

    @property
    def author(self) -> bytes:
        return self.body.author_key

    @property
    def sequence(self) -> int:
        return self.body.sequence

    @property
    def kind(self) -> str:
        return self.body.WhichOneof("kind") or ""

    def describe(self) -> str:
        return f"entry {native.node_id(self.author)}#{self.sequence} ({self.kind})"


def decode_entry(raw: ledger_pb2.LedgerEntry) -> Entry:
    """Decodes an entry and checks its shape and the author's signature."""
    try:
        body = ledger_pb2.EntryBody.FromString(raw.body)
    except DecodeError as error:
        raise LedgerRejection(f"entry body is not an EntryBody: {error}") from None
    if len(body.author_key) != 32:
        raise LedgerRejection("entry has no valid author key")
    where = f"entry {body.author_key.hex()[:16]}#{body.sequence}"
    if body.sequence < 1:
        raise LedgerRejection(f"{where}: sequence numbers start at 1")
    if len(body.previous_hash) != 32:
        raise LedgerRejection(f"{where}: previous_hash must be 32 bytes")
    if not body.WhichOneof("kind"):
        raise LedgerRejection(f"{where}: says nothing happened (no kind)")
    try:
        native.verify_signature(body.author_key, raw.body, raw.signature)
    except native.CryptoError as error:
        raise LedgerRejection(f"{where}: forged or altered (author signature: {error})") from None
    return Entry(raw, body, native.ledger_entry_hash(raw.body, raw.signature))


def sign_entry(
    identity: native.Identity,
    sequence: int,
    previous_hash: bytes,
    previous_issued_ms: int,
    **kind: object,
) -> ledger_pb2.LedgerEntry:
    """A new entry of ``identity``'s chain; ``kind`` is one field of EntryBody's oneof, e.g.
    ``transfer=Transfer(...)``."""
    body = ledger_pb2.EntryBody(
        author_key=identity.public_key,
        sequence=sequence,
        previous_hash=previous_hash,
        issued_unix_ms=max(int(time.time() * 1000), previous_issued_ms),
        **kind,  # type: ignore[arg-type]
    )
    data = body.SerializeToString(deterministic=True)
    return ledger_pb2.LedgerEntry(body=data, signature=identity.sign(data))
