"""A node's replica of the credit ledger: a SQLite file (WAL, synchronous writes) in its data
directory, the rules every replica applies before accepting an entry, and balances derived by
replaying the log.

Acceptance (every replica, for every entry, however it arrived):

- the author's signature verifies (forged or altered entries are refused);
- it extends the author's chain: the next sequence number, naming the hash of the entry before
  (a gap or a broken link is refused); an entry already held is a harmless duplicate; a different
  entry at a sequence already held is a fork, i.e. a double spend: refused, and the two signed
  entries are kept as proof, which freezes the author's account on every replica that sees it;
- sequence 1 is the joining grant of exactly ``GRANT_CREDITS``, and only sequence 1 is;
- served work carries a receipt signed by its provider and co-signed by the author (the router
  that checked the tokens and pays), is paid at most once, by a payer that can afford it;
- a verdict is signed by the author (the verifier, or for a duel result the node that ran the
  duel, whose judges' votes must make the winner: ``swarmserve.verdicts.tally_duel``) and
  recorded at most once; a judge's vote alone is not recorded;
- transfers and stake changes stay within the author's balance.

Balances replay all entries in one order every replica agrees on (time issued, then author, then
sequence), so replicas holding the same entries report the same balances.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.ledger.entries import (
    GENESIS_HASH,
    GRANT_CREDITS,
    MAX_FUTURE_SKEW_MS,
    Entry,
    LedgerRejection,
    decode_entry,
    sign_entry,
)
from swarmserve.v1 import common_pb2, ledger_pb2, verifier_pb2
from swarmserve.verdicts import VerdictError, open_verdict, slashed_account, tally_duel

__all__ = ["AcceptResult", "Balance", "LedgerReplica", "VerifyReport"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    author BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    hash BLOB NOT NULL,
    issued_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (author, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spent (   -- receipts paid and verdicts recorded, each once
    token BLOB PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forks (   -- proof of a double spend: two signed entries, one sequence
    author BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (author, sequence)
) WITHOUT ROWID;
"""


@dataclass
class Balance:
    available: int = 0
    staked: int = 0
    entries: int = 0
    frozen: bool = False  # the account forked its chain (double spend)


@dataclass(frozen=True)
class AcceptResult:
    accepted: int
    duplicates: int
    rejected: tuple[str, ...] = ()  # one message per refused entry


@dataclass
class VerifyReport:
    entries: int = 0
    authors: int = 0
    problems: list[str] = field(default_factory=list)


class LedgerReplica:
    """Thread-safe; every write is one SQLite transaction, durable when the call returns."""

    def __init__(self, path: Path | None) -> None:
        """``path``: the SQLite file (created if missing); None keeps the replica in memory."""
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed entry survives a crash
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._balances: dict[bytes, Balance] | None = None
        self._newest: tuple[int, bytes, int] = (0, b"", 0)  # order key of the last entry applied

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- reading ----------------------------------------------------------------------------

    def head(self, author: bytes) -> tuple[int, bytes, int]:
        """(sequence, hash, issued_ms) of the author's last entry; (0, zeros, 0) if none."""
        row = self._db.execute(
            "SELECT sequence, hash, issued_ms FROM entries WHERE author = ? ORDER BY sequence DESC LIMIT 1", (author,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else (0, GENESIS_HASH, 0)

    def heads(self) -> list[ledger_pb2.ChainHead]:
        with self._lock:
            rows = self._db.execute(
                "SELECT e.author, e.sequence, e.hash FROM entries e JOIN "
                "(SELECT author, MAX(sequence) AS top FROM entries GROUP BY author) h "
                "ON e.author = h.author AND e.sequence = h.top ORDER BY e.author"
            ).fetchall()
        return [ledger_pb2.ChainHead(author_key=a, sequence=s, entry_hash=h) for a, s, h in rows]

    def fetch(self, author: bytes, from_sequence: int, limit: int = 256) -> list[ledger_pb2.LedgerEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body, signature FROM entries WHERE author = ? AND sequence >= ? ORDER BY sequence LIMIT ?",
                (author, from_sequence, limit),
            ).fetchall()
        return [ledger_pb2.LedgerEntry(body=b, signature=s) for b, s in rows]

    def entry_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def verdicts(self) -> list[verifier_pb2.Verdict]:
        """Every recorded verdict (signatures checked on acceptance), in the agreed order."""
        with self._lock:
            rows = self._rows()
        verdicts = []
        for body_bytes, _ in rows:
            body = ledger_pb2.EntryBody.FromString(body_bytes)
            if body.WhichOneof("kind") == "verdict":
                verdicts.append(verifier_pb2.Verdict.FromString(body.verdict.verdict.verdict))
        return verdicts

    def forked(self, author: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM forks WHERE author = ?", (author,)).fetchone() is not None

    def balance(self, account: bytes) -> Balance:
        with self._lock:
            if self._balances is None:
                self._balances = self._derive()
            if self.forked(account):
                return Balance(0, 0, self._balances.get(account, Balance()).entries, frozen=True)
            found = self._balances.get(account, Balance())
            return Balance(found.available, found.staked, found.entries)

    # --- writing ----------------------------------------------------------------------------

    def ensure_grant(self, identity: native.Identity) -> None:
        """Starts this node's chain with its joining grant, if it has no entry yet."""
        with self._lock:
            if self.head(identity.public_key)[0] == 0:
                self.append(identity, grant=ledger_pb2.Grant(credits=GRANT_CREDITS))

    def append(self, identity: native.Identity, **kind: object) -> ledger_pb2.LedgerEntry:
        """Writes a new entry of this node's own chain (its grant first, if it has none)."""
        with self._lock:
            if "grant" not in kind:
                self.ensure_grant(identity)
            sequence, previous, issued = self.head(identity.public_key)
            entry = sign_entry(identity, sequence + 1, previous, issued, **kind)
            result = self.accept([entry])
            if result.rejected:
                raise LedgerRejection(result.rejected[0])
            return entry

    def accept(self, entries: Iterable[ledger_pb2.LedgerEntry]) -> AcceptResult:
        """Checks and appends what is new, in the agreed order; refuses what breaks a rule
        (valid entries in the same batch are still accepted)."""
        decoded: list[Entry] = []
        rejected: list[str] = []
        for raw in entries:
            try:
                decoded.append(decode_entry(raw))
            except LedgerRejection as error:
                rejected.append(str(error))
        decoded.sort(key=lambda e: (e.body.issued_unix_ms, e.author, e.sequence))
        accepted = duplicates = 0
        with self._lock:
            # Entries of one chain may arrive before their predecessors in this order (clock
            # skew); retry until a pass adds nothing.
            pending = decoded
            while pending:
                waiting: list[tuple[Entry, LedgerRejection]] = []
                progress = False
                for entry in pending:
                    try:
                        if self._accept_one(entry):
                            accepted += 1
                            progress = True
                        else:
                            duplicates += 1
                    except _Gap as gap:
                        waiting.append((entry, gap))
                    except LedgerRejection as error:
                        rejected.append(str(error))
                if not progress:
                    rejected.extend(str(error) for _, error in waiting)
                    break
                pending = [entry for entry, _ in waiting]
        return AcceptResult(accepted, duplicates, tuple(rejected))

    def _accept_one(self, entry: Entry) -> bool:
        """True if appended, False if already held; raises LedgerRejection otherwise."""
        where = entry.describe()
        held = self._db.execute(
            "SELECT hash FROM entries WHERE author = ? AND sequence = ?", (entry.author, entry.sequence)
        ).fetchone()
        if held is not None:
            if held[0] == entry.hash:
                return False
            self._db.execute(
                "INSERT OR IGNORE INTO forks VALUES (?, ?, ?, ?)",
                (entry.author, entry.sequence, entry.raw.body, entry.raw.signature),
            )
            self._balances = None
            raise LedgerRejection(
                f"{where}: double spend, the author already signed another entry at this sequence "
                f"(both kept as proof; the account is frozen)"
            )
        sequence, previous, issued = self.head(entry.author)
        if entry.sequence != sequence + 1:
            raise _Gap(f"{where}: the replica holds this author's chain only up to #{sequence}")
        if entry.body.previous_hash != previous:
            raise LedgerRejection(f"{where}: broken link, previous_hash is not the hash of #{sequence}")
        if entry.body.issued_unix_ms < issued:
            raise LedgerRejection(f"{where}: issued before the entry it follows")
        if entry.body.issued_unix_ms > time.time() * 1000 + MAX_FUTURE_SKEW_MS:
            raise LedgerRejection(f"{where}: issued in the future")
        spent = self._check_kind(entry, where)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                (
                    entry.author,
                    entry.sequence,
                    entry.hash,
                    entry.body.issued_unix_ms,
                    entry.raw.body,
                    entry.raw.signature,
                ),
            )
            if spent:
                self._db.execute("INSERT INTO spent VALUES (?)", (spent,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        order = (entry.body.issued_unix_ms, entry.author, entry.sequence)
        if self._balances is not None and order > self._newest:
            _apply(self._balances, entry.body)  # the common case: it goes at the end of the order
        else:
            self._balances = None  # it lands earlier in the agreed order: replay
        self._newest = max(self._newest, order)
        return True

    def _check_kind(self, entry: Entry, where: str) -> bytes:
        """The kind-specific rules; returns the token that must never be spent twice (or b"")."""
        body, kind = entry.body, entry.kind
        if (kind == "grant") != (entry.sequence == 1):
            raise LedgerRejection(f"{where}: a chain starts with its grant, and only there")
        if kind == "grant":
            if body.grant.credits != GRANT_CREDITS:
                raise LedgerRejection(f"{where}: the grant is {GRANT_CREDITS} credits, not {body.grant.credits}")
            return b""
        if self.forked(entry.author):
            raise LedgerRejection(f"{where}: the author's account is frozen (it forked its chain)")
        balance = self.balance(entry.author)
        if kind == "transfer":
            if len(body.transfer.recipient_key) != 32 or body.transfer.credits == 0:
                raise LedgerRejection(f"{where}: a transfer needs a recipient key and credits")
            _afford(balance, body.transfer.credits, where)
            return b""
        if kind == "stake":
            delta = body.stake.delta
            if delta > 0:
                _afford(balance, delta, where)
            elif -delta > balance.staked:
                raise LedgerRejection(f"{where}: releases {-delta} credits of stake, {balance.staked} staked")
            return b""
        if kind == "served":
            return self._check_served(entry, balance, where)
        if kind == "verdict":
            return self._check_verdict(entry, where)
        raise LedgerRejection(f"{where}: unknown kind {kind}")  # pragma: no cover - oneof is closed

    def _check_served(self, entry: Entry, balance: Balance, where: str) -> bytes:
        served = entry.body.served
        if served.payer_key != entry.author:
            raise LedgerRejection(f"{where}: only the payer records what it pays")
        try:
            receipt = common_pb2.Receipt.FromString(served.receipt.receipt)
            native.verify_signature(receipt.node_key, served.receipt.receipt, served.receipt.signature)
        except (DecodeError, native.CryptoError) as error:
            raise LedgerRejection(f"{where}: the receipt is not signed by its provider ({error})") from None
        cosigned = any(
            c.signer_key == entry.author and _valid(c.signer_key, served.receipt.receipt, c.signature)
            for c in served.receipt.cosignatures
        )
        if not cosigned:
            raise LedgerRejection(f"{where}: the receipt is not co-signed by the paying router (unknown signer)")
        if served.credits == 0:
            raise LedgerRejection(f"{where}: served work pays at least one credit")
        _afford(balance, served.credits, where)
        token = b"receipt:" + receipt.node_key + receipt.commitment
        if self._db.execute("SELECT 1 FROM spent WHERE token = ?", (token,)).fetchone():
            raise LedgerRejection(f"{where}: replayed, this receipt was already paid")
        return token

    def _check_verdict(self, entry: Entry, where: str) -> bytes:
        record = entry.body.verdict
        if record.slash_permille > 1000:
            raise LedgerRejection(f"{where}: slashes {record.slash_permille} thousandths of a stake")
        if record.verdict.verifier_key != entry.author:
            raise LedgerRejection(f"{where}: a verdict is recorded by the verifier that signed it")
        try:
            verdict = open_verdict(record.verdict)
            if verdict.kind == verifier_pb2.VERDICT_KIND_DUEL:
                raise VerdictError("a judge's vote is recorded only inside the duel's result")
            if verdict.kind == verifier_pb2.VERDICT_KIND_DUEL_RESULT:
                tally_duel(verdict)
        except VerdictError as error:
            raise LedgerRejection(f"{where}: {error}") from None
        token = b"verdict:" + native.ledger_entry_hash(record.verdict.verdict, record.verdict.signature)
        if self._db.execute("SELECT 1 FROM spent WHERE token = ?", (token,)).fetchone():
            raise LedgerRejection(f"{where}: replayed, this verdict is already recorded")
        return token

    # --- derivation and audit ---------------------------------------------------------------

    def _rows(self) -> list[tuple[bytes, bytes]]:
        return self._db.execute("SELECT body, signature FROM entries ORDER BY issued_ms, author, sequence").fetchall()

    def _derive(self) -> dict[bytes, Balance]:
        balances: dict[bytes, Balance] = defaultdict(Balance)
        for body_bytes, _ in self._rows():
            body = ledger_pb2.EntryBody.FromString(body_bytes)
            _apply(balances, body)
            self._newest = max(self._newest, (body.issued_unix_ms, body.author_key, body.sequence))
        return balances

    def verify(self) -> VerifyReport:
        """Replays the whole log from the file into an empty in-memory replica, which applies
        every rule again: every signature, every link, every balance."""
        with self._lock:
            rows = self._db.execute("SELECT body, signature FROM entries").fetchall()
            authors = self._db.execute("SELECT COUNT(DISTINCT author) FROM entries").fetchone()[0]
        scratch = LedgerReplica(None)
        result = scratch.accept(ledger_pb2.LedgerEntry(body=b, signature=s) for b, s in rows)
        scratch.close()
        return VerifyReport(entries=len(rows), authors=int(authors), problems=list(result.rejected))


class _Gap(LedgerRejection):
    """The entry's predecessor is missing here (it may still arrive)."""


def _valid(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        native.verify_signature(key, message, signature)
    except native.CryptoError:
        return False
    return True


def _afford(balance: Balance, credits: int, where: str) -> None:
    if credits > balance.available:
        raise LedgerRejection(f"{where}: spends {credits} credits with {balance.available} available (double spend)")


def _apply(balances: dict[bytes, Balance], body: ledger_pb2.EntryBody) -> None:
    author = balances[body.author_key]
    author.entries += 1
    kind = body.WhichOneof("kind")
    if kind == "grant":
        author.available += body.grant.credits
    elif kind == "transfer":
        author.available -= body.transfer.credits
        balances[body.transfer.recipient_key].available += body.transfer.credits
    elif kind == "stake":
        author.available -= body.stake.delta
        author.staked += body.stake.delta
    elif kind == "served":
        receipt = common_pb2.Receipt.FromString(body.served.receipt.receipt)
        author.available -= body.served.credits
        balances[receipt.node_key].available += body.served.credits
    elif kind == "verdict":
        verdict = verifier_pb2.Verdict.FromString(body.verdict.verdict.verdict)
        slashed = balances[slashed_account(verdict)]
        slashed.staked -= math.ceil(slashed.staked * body.verdict.slash_permille / 1000)  # burned
