"""The ledger's state machine: accounts derived from the finalized chain, block by block, the
same on every node (a SQLite file in the node's data directory, WAL, synchronous writes).

Invariants:

- State changes only by applying the next finalized block (height = applied + 1, its parent
  the last applied block's digest); a block already applied is recognised by its digest and
  changes nothing, and a different block at an applied height is refused (a fork can only come
  from a broken committee or a wrong genesis, and is reported, never merged).
- Applying a block is one SQLite transaction that also stores the block and its certificate,
  so the state and the blocks it came from are durable together: after a crash the state is at
  some applied block, never between two, and never ahead of the blocks it holds.
- Application is deterministic: a function of the state and the block's bytes alone (no
  clock, no randomness, no local knowledge), so every replica reports the same state root at
  the same height.
- Height 0 carries the genesis file; its accounts and bonds are the only credits not earned.

A transaction, in block order:

- is void (changes nothing, not even the nonce) if it is malformed, badly signed, for another
  chain (:func:`decode_transaction`), or its nonce is not the account's next: so it cannot be
  replayed, and of two transactions with one nonce only the first applies;
- otherwise consumes its nonce, then applies if the account can afford it, or fails;
- transfer: credits move from available to the recipient; bond: available to bonded; unbond:
  bonded to unbonding, released to available ``unbonding_blocks`` later, slashable until then;
- equivocation evidence: if it proves against the committee that a validator signed
  conflicting votes, and that fault was not already punished, burns
  ``equivocation_slash_permille`` of the validator's bonded and unbonding stake.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3

from swarmserve import native
from swarmserve.chain.genesis import Genesis, chain_id
from swarmserve.chain.transactions import Transaction, TransactionError, decode_transaction
from swarmserve.v1 import chain_pb2

__all__ = ["Account", "AppliedBlock", "ChainState", "StateError", "genesis_block"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (
    key BLOB PRIMARY KEY,
    available INTEGER NOT NULL,
    bonded INTEGER NOT NULL,
    nonce INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unbonding (
    key BLOB NOT NULL,
    release_height INTEGER NOT NULL,
    credits INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS unbonding_release ON unbonding (release_height);
CREATE TABLE IF NOT EXISTS punished (fault BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    encoded BLOB NOT NULL,
    certificate BLOB,
    state_root BLOB NOT NULL
);
"""


def genesis_block(genesis_bytes: bytes) -> native.ChainBlock:
    """Block 0 as every validator builds it (``Block::genesis`` in native/src/consensus)."""
    parent = hashlib.sha256(b"").digest()
    return native.decode_chain_block(native.encode_chain_block(parent, 0, 0, [genesis_bytes]))


class StateError(Exception):
    """A block that cannot be applied here: out of order, another chain's, or a fork."""


@dataclass
class Account:
    available: int = 0
    bonded: int = 0
    unbonding: int = 0
    nonce: int = 0


@dataclass(frozen=True)
class AppliedBlock:
    height: int
    digest: bytes
    state_root: bytes
    applied: int = 0  # transactions that took effect
    failed: int = 0  # consumed their nonce but could not be afforded
    void: tuple[str, ...] = field(default_factory=tuple)  # why each void transaction was void


class ChainState:
    """Thread-safe: one writer (the node's block loop), any number of readers."""

    def __init__(self, path: Path | None, genesis: Genesis, genesis_bytes: bytes) -> None:
        self.genesis = genesis
        self.genesis_bytes = genesis_bytes
        self.chain_id = chain_id(genesis_bytes)
        self.committee = [bytes.fromhex(v.key) for v in genesis.validators]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an applied block survives a crash
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        stored = self._meta("chain_id")
        if stored is not None and stored != self.chain_id:
            raise StateError(f"{path} holds another chain's state (its genesis differs)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- reading ----------------------------------------------------------------------------

    def _meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    @property
    def height(self) -> int:
        """Height of the last applied block; -1 before genesis."""
        with self._lock:
            value = self._meta("height")
        return int.from_bytes(value, "big") if value is not None else -1

    @property
    def block_digest(self) -> bytes:
        with self._lock:
            return self._meta("block_digest") or b""

    @property
    def state_root(self) -> bytes:
        with self._lock:
            return self._meta("state_root") or b""

    def account(self, key: bytes) -> Account:
        with self._lock:
            row = self._db.execute("SELECT available, bonded, nonce FROM accounts WHERE key = ?", (key,)).fetchone()
            unbonding = self._db.execute("SELECT COALESCE(SUM(credits), 0) FROM unbonding WHERE key = ?", (key,))
            pending = int(unbonding.fetchone()[0])
        if row is None:
            return Account(unbonding=pending)
        return Account(available=row[0], bonded=row[1], unbonding=pending, nonce=row[2])

    def root_at(self, height: int) -> bytes | None:
        """The state root after the block at ``height``, if applied here."""
        with self._lock:
            row = self._db.execute("SELECT state_root FROM blocks WHERE height = ?", (height,)).fetchone()
        return bytes(row[0]) if row else None

    def blocks(self, from_height: int, limit: int) -> list[chain_pb2.FinalizedBlock]:
        with self._lock:
            rows = self._db.execute(
                "SELECT encoded, certificate FROM blocks WHERE height >= ? ORDER BY height LIMIT ?",
                (from_height, limit),
            ).fetchall()
        return [chain_pb2.FinalizedBlock(block=row[0], certificate=row[1] or b"") for row in rows]

    # --- applying ---------------------------------------------------------------------------

    def apply(self, block: native.ChainBlock, certificate: bytes | None = None) -> AppliedBlock:
        """Applies the next finalized block (see the module's invariants); ``certificate``, if
        given, is stored with it instead of ``block.certificate``."""
        with self._lock:
            height = self.height
            if block.height <= height:
                row = self._db.execute("SELECT digest FROM blocks WHERE height = ?", (block.height,)).fetchone()
                if row is None or bytes(row[0]) != block.digest:
                    raise StateError(f"block {block.height} differs from the one applied at that height (a fork)")
                return AppliedBlock(block.height, block.digest, self.state_root)  # delivered again
            if block.height != height + 1:
                raise StateError(f"block {block.height} does not follow the last applied block {height}")
            if block.height > 0 and block.parent != self.block_digest:
                raise StateError(f"block {block.height} does not build on the last applied block")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = self._apply(block, certificate if certificate is not None else block.certificate)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return result

    def _apply(self, block: native.ChainBlock, certificate: bytes | None) -> AppliedBlock:
        applied = failed = 0
        void: list[str] = []
        if block.height == 0:
            if block.transactions != [self.genesis_bytes]:
                raise StateError("the chain's genesis block carries another genesis file")
            self._set_meta("chain_id", self.chain_id)
            for funded in self.genesis.accounts:
                self._save(bytes.fromhex(funded.key), Account(funded.credits, funded.bonded))
        else:
            self._release_unbonded(block.height)
            for raw in block.transactions:
                try:
                    transaction = decode_transaction(raw, self.chain_id)
                except TransactionError as error:
                    void.append(str(error))
                    continue
                account = self._load(transaction.account)
                if transaction.nonce != account.nonce + 1:
                    void.append(f"nonce {transaction.nonce} is not the account's next ({account.nonce + 1})")
                    continue
                account.nonce += 1
                self._save(transaction.account, account)  # the nonce is spent whatever follows
                if self._execute(transaction, block.height):
                    applied += 1
                else:
                    failed += 1
        root = self._root(block.height, block.digest)
        self._db.execute(
            "INSERT INTO blocks (height, digest, encoded, certificate, state_root) VALUES (?, ?, ?, ?, ?)",
            (block.height, block.digest, block.encoded, certificate, root),
        )
        self._set_meta("height", block.height.to_bytes(8, "big"))
        self._set_meta("block_digest", block.digest)
        self._set_meta("state_root", root)
        return AppliedBlock(block.height, block.digest, root, applied, failed, tuple(void))

    def _execute(self, transaction: Transaction, height: int) -> bool:
        """Applies one transaction whose nonce was just spent; False if it failed."""
        body, key = transaction.body, transaction.account
        account = self._load(key)
        kind = transaction.kind
        if kind == "transfer":
            recipient, credits = body.transfer.recipient_key, body.transfer.credits
            if len(recipient) != 32 or credits < 1 or account.available < credits or recipient == key:
                return False
            account.available -= credits
            self._save(key, account)
            other = self._load(recipient)
            other.available += credits
            self._save(recipient, other)
            return True
        if kind == "bond":
            credits = body.bond.credits
            if credits < 1 or account.available < credits:
                return False
            account.available -= credits
            account.bonded += credits
            self._save(key, account)
            return True
        if kind == "unbond":
            credits = body.unbond.credits
            if credits < 1 or account.bonded < credits:
                return False
            account.bonded -= credits
            self._save(key, account)
            self._db.execute(
                "INSERT INTO unbonding (key, release_height, credits) VALUES (?, ?, ?)",
                (key, height + self.genesis.parameters.unbonding_blocks, credits),
            )
            return True
        if kind == "equivocation":
            return self._punish_equivocation(body.equivocation.evidence)
        return False

    def _punish_equivocation(self, evidence: bytes) -> bool:
        try:
            kind, epoch, view, validator = native.verify_equivocation(self.committee, evidence)
        except (native.ProofError, ValueError):
            return False
        fault = blake3(validator + kind.encode() + epoch.to_bytes(8, "big") + view.to_bytes(8, "big")).digest()
        if self._db.execute("SELECT 1 FROM punished WHERE fault = ?", (fault,)).fetchone():
            return False  # one fault, one punishment, however many report it
        self._db.execute("INSERT INTO punished (fault) VALUES (?)", (fault,))
        self._slash(validator, self.genesis.parameters.equivocation_slash_permille)
        return True

    def _slash(self, key: bytes, permille: int) -> None:
        """Burns ``permille`` thousandths (rounded up) of bonded and of each unbonding amount."""
        account = self._load(key)
        account.bonded -= -(-account.bonded * permille // 1000)
        self._save(key, account)
        rows = self._db.execute("SELECT rowid, credits FROM unbonding WHERE key = ?", (key,)).fetchall()
        for rowid, credits in rows:
            self._db.execute(
                "UPDATE unbonding SET credits = ? WHERE rowid = ?", (credits - -(-credits * permille // 1000), rowid)
            )

    def _release_unbonded(self, height: int) -> None:
        rows = self._db.execute(
            "SELECT key, SUM(credits) FROM unbonding WHERE release_height <= ? GROUP BY key ORDER BY key", (height,)
        ).fetchall()
        for key, credits in rows:
            account = self._load(bytes(key))
            account.available += credits
            self._save(bytes(key), account)
        self._db.execute("DELETE FROM unbonding WHERE release_height <= ?", (height,))

    def _load(self, key: bytes) -> Account:
        row = self._db.execute("SELECT available, bonded, nonce FROM accounts WHERE key = ?", (key,)).fetchone()
        return Account(available=row[0], bonded=row[1], nonce=row[2]) if row else Account()

    def _save(self, key: bytes, account: Account) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO accounts (key, available, bonded, nonce) VALUES (?, ?, ?, ?)",
            (key, account.available, account.bonded, account.nonce),
        )

    def _set_meta(self, name: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def _root(self, height: int, digest: bytes) -> bytes:
        """BLAKE3 over the block and every account and unbonding record in key order."""
        hasher = blake3(b"swarmserve-state-v1")
        hasher.update(height.to_bytes(8, "big") + digest)
        for key, available, bonded, nonce in self._db.execute(
            "SELECT key, available, bonded, nonce FROM accounts ORDER BY key"
        ):
            hasher.update(
                bytes(key) + available.to_bytes(8, "big") + bonded.to_bytes(8, "big") + nonce.to_bytes(8, "big")
            )
        for key, release, credits in self._db.execute(
            "SELECT key, release_height, credits FROM unbonding ORDER BY key, release_height, credits"
        ):
            hasher.update(b"u" + bytes(key) + release.to_bytes(8, "big") + credits.to_bytes(8, "big"))
        for (fault,) in self._db.execute("SELECT fault FROM punished ORDER BY fault"):
            hasher.update(b"p" + bytes(fault))
        return hasher.digest()
