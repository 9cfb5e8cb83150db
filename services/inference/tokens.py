"""A provider's payment tokens (Privacy Pass style; the cryptography is ``native.TokenIssuer``):
sold for cheques, redeemed with requests, each spent once.

Invariants:

- The issuing key derives from a 32-byte seed kept in the node's data directory (mode 0600), so
  tokens bought before a restart are still good after it; the spent nonces are kept beside it in
  SQLite, so none can be spent twice, restart or not.
- A token proves only that someone paid for it: the provider cannot tell which purchase (or
  which payer) it came from. The payer's identity reaches the provider at purchase only, with
  the cheque, never with a request.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from swarmserve import native
from swarmserve.chain.storage import open_database
from swarmserve.rpc import PermissionDenied

__all__ = ["TokenDesk"]

SEED_FILE = "token.key"
_SCHEMA = "CREATE TABLE IF NOT EXISTS spent (nonce BLOB PRIMARY KEY) WITHOUT ROWID;"


def _load_seed(directory: Path) -> bytes:
    path = directory / SEED_FILE
    if not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(32))
    if path.stat().st_mode & 0o077:
        raise native.KeyFileError(f"{path} can be read by group or others; refusing to use it")
    return path.read_bytes()


class TokenDesk:
    """Thread-safe: callers run it off the event loop."""

    def __init__(self, directory: Path | None, credits_per_token: int) -> None:
        self.issuer = native.TokenIssuer(_load_seed(directory) if directory else secrets.token_bytes(32))
        self.credits_per_token = credits_per_token
        self._db = open_database(directory / "tokens.sqlite3" if directory else None, _SCHEMA)
        self._lock = threading.Lock()

    @property
    def public_key(self) -> bytes:
        return self.issuer.public_key

    def issue(self, blinded: Sequence[bytes]) -> tuple[list[bytes], bytes]:
        return self.issuer.issue(blinded)

    def check(self, tokens: Sequence[tuple[bytes, bytes]], needed: int) -> None:
        """Raises PermissionDenied unless ``tokens`` are at least ``needed`` tokens of this node,
        distinct and unspent (the checks before a slot is taken; :meth:`spend` is final)."""
        if len(tokens) < needed:
            raise PermissionDenied(
                f"this node bills: the request needs {needed} payment tokens "
                f"({self.credits_per_token} credits each; Inference.BuyTokens), it carries {len(tokens)}"
            )
        if len({nonce for nonce, _ in tokens}) != len(tokens):
            raise PermissionDenied("a payment token appears twice in the request")
        if not all(self.issuer.check(nonce, output) for nonce, output in tokens):
            raise PermissionDenied("a payment token is not one of this node's (forged, or for another key)")
        with self._lock:
            spent = self._db.execute(
                f"SELECT COUNT(*) FROM spent WHERE nonce IN ({','.join('?' * len(tokens))})",
                [nonce for nonce, _ in tokens],
            ).fetchone()[0] if tokens else 0  # fmt: skip
        if spent:
            raise PermissionDenied("a payment token was already spent")

    def spend(self, tokens: Sequence[tuple[bytes, bytes]]) -> None:
        """Marks ``tokens`` spent, all or none; PermissionDenied if any was spent meanwhile."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO spent (nonce) VALUES (?)", [(nonce,) for nonce, _ in tokens])
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise PermissionDenied("a payment token was already spent") from None

    def spent(self) -> int:
        """How many tokens were spent here, ever."""
        with self._lock:
            count: int = self._db.execute("SELECT COUNT(*) FROM spent").fetchone()[0]
        return count

    def close(self) -> None:
        with self._lock:
            self._db.close()
