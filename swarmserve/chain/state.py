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
- equivocation evidence: if it proves against the committee of the epoch it names that a
  validator signed conflicting votes, and that fault was not already punished, burns
  ``equivocation_slash_permille`` of the validator's bonded and unbonding stake;
- candidacy: the signing node offers to validate at an IP:port address (or withdraws).

Committees: epoch 0's is the genesis file's; after the last block of epoch e (and its
transactions), the committee of epoch e+1 is chosen from the candidates by their accounts'
bonded stake (:func:`swarmserve.chain.committee.choose_committee`). A block of epoch e is final
only with a certificate of epoch e's committee.

Accounts and their members: a key's credits are those of its account, which is the key itself
unless it was made a member of another account (an operator's nodes sharing one account, with
the member's consent). Spending, earning and stake go to the account; nonces stay per key.

Payments: a cheque settles once per epoch per (payer, payee); it pays what its cumulative
amount exceeds the settled one by, as far as the payer's account affords it. Paying a member of
one's own account is refused (serving one's own users is free). One transaction settles many
cheques, each judged alone; it fails only if none pays anything.

Verdicts (one per receipt) are recorded only from an account the lottery drew for that receipt
(:func:`swarmserve.chain.lottery.draw`, seeded by an epoch's first block over the stakes as they
were at that block; never the provider's account), with a receipt co-signed by someone outside
the provider's account (a check the provider asked for about itself counts for nothing):

- a PASS is recorded as passed, and changes no stake;
- a FAIL carries the prompt and tokens and is pending for ``appeal_blocks``; unappealed, it is
  then decided and burns ``check_fail_slash_permille`` of the provider account's stake (bonded
  and unbonding); appealed by the provider, a committee drawn the same way votes for
  ``appeal_blocks`` (neither the accused's account nor the accuser's sits on it), and a
  majority to overturn burns ``overturned_slash_permille`` of the verifier's stake instead
  (otherwise the FAIL stands and slashes as above);
- a duel result counts only with a majority of votes (:func:`swarmserve.verdicts.tally_duel`)
  from judges the lottery drew for the organiser's next duel; it burns ``duel_slash_permille``
  of the loser's stake.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3

from swarmserve import native
from swarmserve.chain.cheques import ChequeError, open_cheque
from swarmserve.chain.committee import Candidate, choose_committee, valid_consensus_address
from swarmserve.chain.evidence import EvidenceError, check_evidence, verdict_id
from swarmserve.chain.genesis import Genesis, chain_id
from swarmserve.chain.lottery import draw
from swarmserve.chain.state_hash import LatticeHash, row_expression
from swarmserve.chain.storage import open_database
from swarmserve.chain.transactions import Transaction, TransactionError, decode_transaction
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2, verifier_pb2
from swarmserve.verdicts import VerdictError, open_verdict, tally_duel

log = get_logger("swarmserve.chain")

__all__ = ["Account", "AppliedBlock", "ChainState", "StateError", "VerdictRecord", "genesis_block"]

MEMBER_CONSENT = b"swarmserve-member-v1"

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
CREATE TABLE IF NOT EXISTS members (member BLOB PRIMARY KEY, account BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settlements (
    payer BLOB NOT NULL,
    payee BLOB NOT NULL,
    settled INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (payer, payee)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epoch_stakes (
    epoch INTEGER NOT NULL,
    account BLOB NOT NULL,
    stake INTEGER NOT NULL,
    PRIMARY KEY (epoch, account)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verdicts (
    id BLOB PRIMARY KEY,
    provider BLOB NOT NULL,
    provider_account BLOB NOT NULL,
    verifier BLOB NOT NULL,
    verifier_account BLOB NOT NULL,
    score_permille INTEGER NOT NULL,
    status TEXT NOT NULL,
    recorded_height INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    evidence BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verdicts_deadline ON verdicts (status, deadline);
CREATE TABLE IF NOT EXISTS jurors (
    verdict BLOB NOT NULL,
    account BLOB NOT NULL,
    uphold INTEGER,
    PRIMARY KEY (verdict, account)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS duels (
    id BLOB PRIMARY KEY,
    organiser BLOB NOT NULL,
    winner BLOB NOT NULL,
    loser BLOB NOT NULL,
    recorded_height INTEGER NOT NULL,
    result BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS organisers (key BLOB PRIMARY KEY, duels INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS candidates (key BLOB PRIMARY KEY, address TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS committees (
    epoch INTEGER NOT NULL,
    key BLOB NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (epoch, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_changes (added INTEGER NOT NULL, row TEXT NOT NULL);
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
    encoded = native.encode_chain_block(parent, 0, 0, [genesis_bytes])
    # The genesis file is the one transaction not bound by the size limit of submitted ones.
    return native.decode_chain_block(encoded, max_transaction_bytes=max(32768, len(genesis_bytes)))


class StateError(Exception):
    """A block that cannot be applied here: out of order, another chain's, or a fork."""


@dataclass
class Account:
    available: int = 0
    bonded: int = 0
    unbonding: int = 0
    nonce: int = 0  # the key's own, whatever account it spends from
    account_key: bytes = b""  # the account the figures are of (the key, or the one it is a member of)


@dataclass(frozen=True)
class VerdictRecord:
    """A check's verdict as the chain holds it; ``status`` is passed, pending (a FAIL in its
    appeal window), appealed, failed (decided) or overturned."""

    id: bytes
    provider: bytes
    verifier: bytes
    status: str
    score: float
    recorded_height: int
    deadline: int


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
        self._db = open_database(path, _SCHEMA)  # an applied block survives a crash
        self._db.execute("PRAGMA recursive_triggers = ON")  # INSERT OR REPLACE reports the row it replaces
        self._db.executescript(_TRIGGERS)
        self._lock = threading.RLock()
        stored = self._meta("chain_id")
        if stored is not None and stored != self.chain_id:
            raise StateError(f"{path} holds another chain's state (its genesis differs)")
        if self.height >= 0 and self._meta("state_set") is None:
            raise StateError(
                f"{path} was written by an older swarmserve, whose state root is computed differently; "
                "remove the node's data directory to start it over"
            )

    @classmethod
    def open_replica(cls, data_dir: Path) -> ChainState:
        """A node's replica, from its data directory alone (its genesis is its block 0)."""
        path = data_dir / "chain.sqlite3"
        if not path.is_file():
            raise StateError(f"no replica of the ledger's chain in {data_dir}")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT encoded FROM blocks WHERE height = 0").fetchone()
        if row is None:
            raise StateError(f"the replica in {data_dir} has no genesis block yet")
        genesis_bytes = native.decode_chain_block(bytes(row[0]), max_transaction_bytes=len(row[0])).transactions[0]
        return cls(path, Genesis.model_validate_json(genesis_bytes), genesis_bytes)

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
        """The credits of ``key``'s account and ``key``'s own nonce."""
        with self._lock:
            owner = self._account_of(key)
            account = self._load(owner)
            nonce = self._load(key).nonce
            pending = self._db.execute("SELECT COALESCE(SUM(credits), 0) FROM unbonding WHERE key = ?", (owner,))
            account.unbonding = int(pending.fetchone()[0])
        account.nonce, account.account_key = nonce, owner
        return account

    def account_of(self, key: bytes) -> bytes:
        with self._lock:
            return self._account_of(key)

    def settled(self, payer: bytes, payee: bytes) -> tuple[int, int]:
        """(credits settled so far, epoch of the last settlement; -1 if none) for a pair."""
        with self._lock:
            row = self._db.execute(
                "SELECT settled, epoch FROM settlements WHERE payer = ? AND payee = ?", (payer, payee)
            ).fetchone()
        return (row[0], row[1]) if row else (0, -1)

    def settlements(self) -> list[tuple[bytes, bytes, int, int]]:
        """(payer, payee, credits settled so far, epoch of the last settlement) of every pair."""
        with self._lock:
            rows = self._db.execute("SELECT payer, payee, settled, epoch FROM settlements ORDER BY payer, payee")
            return [(bytes(payer), bytes(payee), settled, epoch) for payer, payee, settled, epoch in rows]

    def epoch_of(self, height: int) -> int:
        return height // self.genesis.parameters.epoch_blocks

    def last_of_epoch(self, epoch: int) -> int:
        """The height of the epoch's last block (its committee's last to finalize)."""
        return (epoch + 1) * self.genesis.parameters.epoch_blocks - 1

    def committee_of(self, epoch: int) -> list[tuple[bytes, str]]:
        """(key, consensus address) of the epoch's validators in key order; [] while the epoch
        before it is not fully applied here."""
        with self._lock:
            rows = self._db.execute("SELECT key, address FROM committees WHERE epoch = ? ORDER BY key", (epoch,))
            return [(bytes(key), address) for key, address in rows]

    def committees(self) -> dict[int, list[tuple[bytes, str]]]:
        """Every epoch's committee this replica knows."""
        known: dict[int, list[tuple[bytes, str]]] = {}
        with self._lock:
            for epoch, key, address in self._db.execute(
                "SELECT epoch, key, address FROM committees ORDER BY epoch, key"
            ):
                known.setdefault(epoch, []).append((bytes(key), address))
        return known

    def candidates(self) -> dict[bytes, str]:
        """Nodes that offered to validate, with their consensus addresses."""
        with self._lock:
            return {bytes(key): address for key, address in self._db.execute("SELECT key, address FROM candidates")}

    def lottery(self, epoch: int, subject: bytes, count: int, excluded: set[bytes]) -> list[bytes]:
        """The accounts drawn for ``subject`` with the seed and stakes of ``epoch`` ([] if this
        replica has not applied that epoch's first block)."""
        with self._lock:
            return self._draw(epoch, subject, count, excluded)

    def check_assignment(self, subject: bytes, provider: bytes) -> tuple[int, list[bytes]]:
        """The lottery epoch a verdict submitted now names, and the accounts it draws (never the
        provider's) to verify a receipt (``subject``: its :func:`verdict_id`) from ``provider``."""
        with self._lock:
            epoch = self.epoch_of(self.height)
            excluded = {self._account_of(provider)}
            return epoch, self._draw(epoch, subject, self.genesis.parameters.verifiers_per_check, excluded)

    def verdict(self, identifier: bytes) -> VerdictRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, provider, verifier, status, score_permille, recorded_height, deadline FROM verdicts "
                "WHERE id = ?",
                (identifier,),
            ).fetchone()
        return _verdict_record(row) if row else None

    def reputation_events(self, after: int) -> tuple[int, list[tuple[bytes, float, bool] | verifier_pb2.Verdict]]:
        """What reputation is made of, decided after height ``after`` up to this replica's height
        (returned with them), in the chain's order: (provider, score, failed) for each check
        passed or FAIL decided, and each duel result (its votes rechecked when recorded)."""
        with self._lock:
            height = self.height
            checks = self._db.execute(
                "SELECT CASE status WHEN 'passed' THEN recorded_height ELSE deadline END AS at, id, provider, "
                "score_permille, status FROM verdicts WHERE status IN ('passed', 'failed') AND at > ? AND at <= ?",
                (after, height),
            ).fetchall()
            duels = self._db.execute(
                "SELECT recorded_height, id, result FROM duels WHERE recorded_height > ? AND recorded_height <= ?",
                (after, height),
            ).fetchall()
        events: list[tuple[int, bytes, tuple[bytes, float, bool] | verifier_pb2.Verdict]] = [
            (at, bytes(i), (bytes(provider), score / 1000, status == "failed"))
            for at, i, provider, score, status in checks
        ]
        events += [(at, bytes(i), verifier_pb2.Verdict.FromString(result)) for at, i, result in duels]
        events.sort(key=lambda event: (event[0], event[1]))
        return height, [event for _, _, event in events]

    def accusations(self, provider: bytes) -> list[bytes]:
        """Ids of FAILs against ``provider`` still open to appeal."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM verdicts WHERE provider = ? AND status = 'pending' AND deadline >= ? ORDER BY id",
                (provider, self.height + 1),
            ).fetchall()
        return [bytes(row[0]) for row in rows]

    def juror_duties(self, account: bytes) -> list[tuple[bytes, chain_pb2.VerdictEvidence]]:
        """Appealed FAILs on whose committee ``account`` sits and has not voted yet, with the
        evidence to re-execute."""
        with self._lock:
            rows = self._db.execute(
                "SELECT v.id, v.evidence FROM verdicts v JOIN jurors j ON j.verdict = v.id "
                "WHERE j.account = ? AND j.uphold IS NULL AND v.status = 'appealed' AND v.deadline >= ? ORDER BY v.id",
                (account, self.height + 1),
            ).fetchall()
        return [(bytes(i), chain_pb2.VerdictEvidence.FromString(evidence)) for i, evidence in rows]

    def jurors(self, identifier: bytes) -> dict[bytes, bool | None]:
        """An appeal committee: account -> its vote (True: uphold), None if it has not voted."""
        with self._lock:
            rows = self._db.execute("SELECT account, uphold FROM jurors WHERE verdict = ?", (identifier,)).fetchall()
        return {bytes(account): None if uphold is None else bool(uphold) for account, uphold in rows}

    def duels_organised(self, organiser: bytes) -> int:
        with self._lock:
            row = self._db.execute("SELECT duels FROM organisers WHERE key = ?", (organiser,)).fetchone()
        return row[0] if row else 0

    def digest_at(self, height: int) -> bytes:
        """The digest of the applied block at ``height``."""
        with self._lock:
            row = self._db.execute("SELECT digest FROM blocks WHERE height = ?", (height,)).fetchone()
        if row is None:
            raise StateError(f"block {height} is not applied here")
        return bytes(row[0])

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
                for member in funded.members:
                    self._db.execute(
                        "INSERT INTO members (member, account) VALUES (?, ?)",
                        (bytes.fromhex(member), bytes.fromhex(funded.key)),
                    )
            validators = [(bytes.fromhex(v.key), v.address) for v in self.genesis.validators]
            self._db.executemany("INSERT INTO candidates (key, address) VALUES (?, ?)", validators)
            self._db.executemany("INSERT INTO committees (epoch, key, address) VALUES (0, ?, ?)", validators)
            self._snapshot_stakes(0)
        else:
            self._release_unbonded(block.height)
            self._decide_verdicts(block.height)
            if block.height % self.genesis.parameters.epoch_blocks == 0:
                self._snapshot_stakes(self.epoch_of(block.height))
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
                if self._execute_alone(transaction, block.height):
                    applied += 1
                else:
                    failed += 1
        if block.height == self.last_of_epoch(self.epoch_of(block.height)):
            self._choose_committee(self.epoch_of(block.height) + 1)
        root = self._root(block.height, block.digest)
        self._db.execute(
            "INSERT INTO blocks (height, digest, encoded, certificate, state_root) VALUES (?, ?, ?, ?, ?)",
            (block.height, block.digest, block.encoded, certificate, root),
        )
        self._set_meta("height", block.height.to_bytes(8, "big"))
        self._set_meta("block_digest", block.digest)
        self._set_meta("state_root", root)
        return AppliedBlock(block.height, block.digest, root, applied, failed, tuple(void))

    def _execute_alone(self, transaction: Transaction, height: int) -> bool:
        """Executes a transaction so that nothing it does can stop the chain: any error it raises
        (the same on every replica, application being deterministic) undoes it, and it counts
        as failed."""
        self._db.execute("SAVEPOINT transaction_")
        try:
            done = self._execute(transaction, height)
        except Exception as error:
            self._db.execute("ROLLBACK TO transaction_")
            log.warning("a transaction raised; undone", kind=transaction.kind, error=repr(error))
            done = False
        self._db.execute("RELEASE transaction_")
        return done

    def _execute(self, transaction: Transaction, height: int) -> bool:
        """Applies one transaction whose nonce was just spent; False if it failed."""
        body, signer = transaction.body, transaction.account
        key = self._account_of(signer)  # whose credits the transaction moves
        match transaction.kind:
            case "transfer":
                recipient = self._account_of(body.transfer.recipient_key)
                return (
                    len(body.transfer.recipient_key) == 32
                    and recipient != key
                    and self._move(key, recipient, body.transfer.credits)
                )
            case "bond":
                return self._bond(key, body.bond.credits)
            case "unbond":
                return self._unbond(key, body.unbond.credits, height)
            case "equivocation":
                return self._punish_equivocation(body.equivocation.evidence)
            case "add_member":
                return self._add_member(signer, body.add_member)
            case "remove_member":
                member = body.remove_member.member_key
                if self._account_of(member) != signer or member == signer:
                    return False
                self._db.execute("DELETE FROM members WHERE member = ?", (member,))
                return True
            case "settle":
                return sum(self._settle(cheque, height) for cheque in body.settle.cheques) > 0
            case "verdict":
                return self._record_verdict(signer, body.verdict, height)
            case "appeal":
                return self._appeal(signer, body.appeal.verdict_id, height)
            case "appeal_vote":
                return self._vote(signer, body.appeal_vote, height)
            case "duel":
                return self._record_duel(body.duel, height)
            case "candidacy":
                return self._candidacy(signer, body.candidacy.address)
        return False

    # --- credits ----------------------------------------------------------------------------

    def _move(self, payer: bytes, payee: bytes, credits: int) -> bool:
        account = self._load(payer)
        if credits < 1 or account.available < credits:
            return False
        account.available -= credits
        self._save(payer, account)
        other = self._load(payee)
        other.available += credits
        self._save(payee, other)
        return True

    def _bond(self, key: bytes, credits: int) -> bool:
        account = self._load(key)
        if credits < 1 or account.available < credits:
            return False
        account.available -= credits
        account.bonded += credits
        self._save(key, account)
        return True

    def _unbond(self, key: bytes, credits: int, height: int) -> bool:
        account = self._load(key)
        if credits < 1 or account.bonded < credits:
            return False
        account.bonded -= credits
        self._save(key, account)
        self._db.execute(
            "INSERT INTO unbonding (key, release_height, credits) VALUES (?, ?, ?)",
            (key, height + self.genesis.parameters.unbonding_blocks, credits),
        )
        return True

    def _add_member(self, account: bytes, request: chain_pb2.AddMember) -> bool:
        member = request.member_key
        if len(member) != 32 or member == account or self._account_of(account) != account:
            return False  # an account cannot join itself, and a member cannot have members
        try:
            native.verify_signature(member, MEMBER_CONSENT + self.chain_id + account, request.consent)
        except native.CryptoError:
            return False
        holdings = self._load(member)
        if (
            self._account_of(member) != member
            or holdings.available
            or holdings.bonded
            or self._db.execute("SELECT 1 FROM unbonding WHERE key = ?", (member,)).fetchone()
            or self._db.execute("SELECT 1 FROM members WHERE account = ?", (member,)).fetchone()
        ):
            return False  # already a member, or holds credits or members of its own
        self._db.execute("INSERT INTO members (member, account) VALUES (?, ?)", (member, account))
        return True

    def _settle(self, signed: chain_pb2.SignedCheque, height: int) -> bool:
        try:
            cheque = open_cheque(signed, self.chain_id)
        except ChequeError:
            return False
        payer, payee = self._account_of(cheque.payer), self._account_of(cheque.payee)
        if payer == payee:
            return False  # one's own users are served for free
        settled, last_epoch = self.settled(cheque.payer, cheque.payee)
        epoch = self.epoch_of(height)
        if last_epoch >= epoch or cheque.cumulative <= settled:
            return False
        paid = min(cheque.cumulative - settled, self._load(payer).available)
        if paid:
            self._move(payer, payee, paid)
        self._db.execute(
            "INSERT OR REPLACE INTO settlements (payer, payee, settled, epoch) VALUES (?, ?, ?, ?)",
            (cheque.payer, cheque.payee, settled + paid, epoch),
        )
        return paid > 0

    # --- verdicts and duels ---------------------------------------------------------------------------

    def _snapshot_stakes(self, epoch: int) -> None:
        """The stakes lotteries seeded by this epoch draw from. Only the last ``lottery_epochs``
        epochs' are kept, so a verdict or duel can name only a recent seed (no searching old
        epochs for a draw that suits)."""
        self._db.execute("DELETE FROM epoch_stakes WHERE epoch <= ?", (epoch - self.genesis.parameters.lottery_epochs,))
        self._db.execute(
            "INSERT INTO epoch_stakes (epoch, account, stake) SELECT ?, key, bonded FROM accounts WHERE bonded >= ?",
            (epoch, self.genesis.parameters.verifier_min_stake),
        )

    def _latest_seed_epoch(self, height: int) -> int:
        """The latest epoch whose first block comes before ``height``."""
        return self.epoch_of(height - 1)

    def _draw(self, epoch: int, subject: bytes, count: int, excluded: set[bytes]) -> list[bytes]:
        """[] for an epoch whose stakes are gone, or whose first block is not applied yet (the block
        being applied cannot seed its own transactions' draws)."""
        seed = self._db.execute(
            "SELECT digest FROM blocks WHERE height = ?", (epoch * self.genesis.parameters.epoch_blocks,)
        ).fetchone()
        if seed is None:
            return []
        stakes = dict(self._db.execute("SELECT account, stake FROM epoch_stakes WHERE epoch = ?", (epoch,)).fetchall())
        return draw(bytes(seed[0]), subject, {bytes(k): v for k, v in stakes.items()}, count, excluded=excluded)

    def _record_verdict(self, signer: bytes, record: chain_pb2.RecordVerdict, height: int) -> bool:
        try:
            verdict = open_verdict(record.verdict)
        except VerdictError:
            return False
        failed = verdict.outcome == verifier_pb2.VERDICT_OUTCOME_FAIL
        if (
            record.verdict.verifier_key != signer
            or verdict.kind != verifier_pb2.VERDICT_KIND_CHECK
            or verdict.outcome not in (verifier_pb2.VERDICT_OUTCOME_PASS, verifier_pb2.VERDICT_OUTCOME_FAIL)
        ):
            return False
        try:
            facts = check_evidence(record.evidence, with_stream=failed)
        except EvidenceError:
            return False
        provider = facts.receipt.node_key
        if provider != verdict.provider_key or facts.receipt.request_id != verdict.subject_id:
            return False
        provider_account, verifier_account = self._account_of(provider), self._account_of(signer)
        if not {self._account_of(c) for c in facts.cosigners} - {provider_account}:
            return False  # a check the provider asked for about itself counts for nothing
        identifier = verdict_id(record.evidence.receipt)
        if self._db.execute("SELECT 1 FROM verdicts WHERE id = ?", (identifier,)).fetchone():
            return False  # one verdict per served stream
        drawn = self._draw(
            record.lottery_epoch, identifier, self.genesis.parameters.verifiers_per_check, {provider_account}
        )
        if verifier_account not in drawn:
            return False  # the lottery did not assign this verifier
        self._db.execute(
            "INSERT INTO verdicts (id, provider, provider_account, verifier, verifier_account, "
            "score_permille, status, recorded_height, deadline, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                identifier,
                provider,
                provider_account,
                signer,
                verifier_account,
                round(verdict.score * 1000),
                "pending" if failed else "passed",
                height,
                height + self.genesis.parameters.appeal_blocks if failed else height,
                record.evidence.SerializeToString(deterministic=True) if failed else None,
            ),
        )
        return True

    def _appeal(self, signer: bytes, identifier: bytes, height: int) -> bool:
        row = self._db.execute(
            "SELECT provider_account, verifier_account, deadline FROM verdicts WHERE id = ? AND status = 'pending'",
            (identifier,),
        ).fetchone()
        if row is None or self._account_of(signer) != bytes(row[0]) or height > row[2]:
            return False
        excluded = {bytes(row[0]), bytes(row[1])}  # neither the accused nor the accuser sits on it
        parameters = self.genesis.parameters
        committee = self._draw(
            self._latest_seed_epoch(height), b"appeal" + identifier, parameters.appeal_committee, excluded
        )
        for account in committee:
            self._db.execute("INSERT INTO jurors (verdict, account, uphold) VALUES (?, ?, NULL)", (identifier, account))
        self._db.execute(
            "UPDATE verdicts SET status = 'appealed', deadline = ? WHERE id = ?",
            (height + parameters.appeal_blocks, identifier),
        )
        return True

    def _vote(self, signer: bytes, vote: chain_pb2.AppealVote, height: int) -> bool:
        row = self._db.execute(
            "SELECT deadline FROM verdicts WHERE id = ? AND status = 'appealed'", (vote.verdict_id,)
        ).fetchone()
        if row is None or height > row[0]:
            return False
        cursor = self._db.execute(
            "UPDATE jurors SET uphold = ? WHERE verdict = ? AND account = ? AND uphold IS NULL",
            (int(vote.uphold), vote.verdict_id, self._account_of(signer)),
        )
        return cursor.rowcount == 1

    def _decide_verdicts(self, height: int) -> None:
        """FAILs whose window closed before ``height``: unappealed ones stand; appealed ones are
        overturned if more jurors voted to overturn than to uphold."""
        parameters = self.genesis.parameters
        rows = self._db.execute(
            "SELECT id, provider_account, verifier_account, status FROM verdicts "
            "WHERE status IN ('pending', 'appealed') AND deadline < ? ORDER BY deadline, id",
            (height,),
        ).fetchall()
        for identifier, provider_account, verifier_account, status in rows:
            overturned = False
            if status == "appealed":
                votes = [
                    uphold
                    for (uphold,) in self._db.execute("SELECT uphold FROM jurors WHERE verdict = ?", (identifier,))
                ]
                overturned = votes.count(0) > votes.count(1)
            if overturned:
                self._slash(bytes(verifier_account), parameters.overturned_slash_permille)
            else:
                self._slash(bytes(provider_account), parameters.check_fail_slash_permille)
            self._db.execute(
                "UPDATE verdicts SET status = ?, deadline = ? WHERE id = ?",
                ("overturned" if overturned else "failed", height, identifier),
            )

    def _record_duel(self, record: chain_pb2.RecordDuel, height: int) -> bool:
        """Anyone may submit an organiser's signed result: the draw is keyed by the organiser."""
        try:
            tally = tally_duel(open_verdict(record.result))
        except VerdictError:
            return False
        organiser = record.result.verifier_key
        organised = self.duels_organised(organiser)
        parties = {self._account_of(tally.winner), self._account_of(tally.loser), self._account_of(organiser)}
        subject = b"duel" + organiser + organised.to_bytes(8, "big")
        drawn = set(self._draw(record.lottery_epoch, subject, self.genesis.parameters.judges_per_duel, parties))
        judges = [self._account_of(j) for j in tally.judges_agreeing + tally.judges_dissenting + tally.judges_undecided]
        if len(set(judges)) != len(judges) or not set(judges) <= drawn:
            return False  # only the judges drawn for this organiser's next duel, each account once
        identifier = blake3(b"swarmserve-duel-v1" + record.result.verdict).digest()
        if self._db.execute("SELECT 1 FROM duels WHERE id = ?", (identifier,)).fetchone():
            return False  # recorded already
        self._db.execute("INSERT OR REPLACE INTO organisers (key, duels) VALUES (?, ?)", (organiser, organised + 1))
        self._db.execute(
            "INSERT INTO duels (id, organiser, winner, loser, recorded_height, result) VALUES (?, ?, ?, ?, ?, ?)",
            (identifier, organiser, tally.winner, tally.loser, height, record.result.verdict),
        )
        self._slash(self._account_of(tally.loser), self.genesis.parameters.duel_slash_permille)
        return True

    # --- committees -------------------------------------------------------------------------

    def _candidacy(self, node: bytes, address: str) -> bool:
        if not address:
            return self._db.execute("DELETE FROM candidates WHERE key = ?", (node,)).rowcount > 0
        if not valid_consensus_address(address):
            return False
        self._db.execute("INSERT OR REPLACE INTO candidates (key, address) VALUES (?, ?)", (node, address))
        return True

    def _choose_committee(self, epoch: int) -> None:
        parameters = self.genesis.parameters
        candidates = []
        for key, address in self._db.execute("SELECT key, address FROM candidates ORDER BY key").fetchall():
            account = self._account_of(bytes(key))
            candidates.append(Candidate(bytes(key), address, account, self._load(account).bonded))
        chosen = choose_committee(
            candidates,
            self.committee_of(epoch - 1),
            size=parameters.committee_size,
            min_stake=parameters.validator_min_stake,
            min_committee=parameters.min_committee,
        )
        self._db.executemany(
            "INSERT INTO committees (epoch, key, address) VALUES (?, ?, ?)", [(epoch, k, a) for k, a in chosen]
        )

    # --- stake ------------------------------------------------------------------------------

    def _punish_equivocation(self, evidence: bytes) -> bool:
        try:
            committee = [key for key, _ in self.committee_of(native.equivocation_epoch(evidence))]
            kind, epoch, view, validator = native.verify_equivocation(committee, evidence)
        except (native.ProofError, ValueError):
            return False
        fault = blake3(validator + kind.encode() + epoch.to_bytes(8, "big") + view.to_bytes(8, "big")).digest()
        if self._db.execute("SELECT 1 FROM punished WHERE fault = ?", (fault,)).fetchone():
            return False  # one fault, one punishment, however many report it
        self._db.execute("INSERT INTO punished (fault) VALUES (?)", (fault,))
        self._slash(self._account_of(validator), self.genesis.parameters.equivocation_slash_permille)
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

    # --- storage ----------------------------------------------------------------------------

    def _account_of(self, key: bytes) -> bytes:
        row = self._db.execute("SELECT account FROM members WHERE member = ?", (key,)).fetchone()
        return bytes(row[0]) if row else key

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
        """BLAKE3 over the block and the multiset hash of every row of the state's tables, brought
        up to date with the rows this block added and removed (the triggers log them)."""
        # A row changed many times in one block (a payee paid by many cheques) nets out to its
        # first and last versions: only those are hashed.
        net: Counter[str] = Counter()
        for added, row in self._db.execute("SELECT added, row FROM state_changes"):
            net[row] += 1 if added else -1
        accumulator = LatticeHash(self._meta("state_set"))
        accumulator.update(
            [row.encode() for row, n in net.items() for _ in range(n)],
            [row.encode() for row, n in net.items() for _ in range(-n)],
        )
        self._db.execute("DELETE FROM state_changes")
        self._set_meta("state_set", accumulator.value)
        return blake3(b"swarmserve-state-v3" + height.to_bytes(8, "big") + digest + accumulator.value).digest()

    def recount_state_set(self) -> bool:
        """True if the kept multiset hash is that of the rows the tables hold now (recomputed
        from every row: what ``ledger verify`` checks, and what the root cost before it was
        kept incrementally)."""
        recount = LatticeHash()
        with self._lock:
            for table, columns in _STATE_TABLES:
                rows = self._db.execute(f"SELECT {row_expression(table, columns)} FROM {table}").fetchall()
                recount.update([row.encode() for (row,) in rows], [])
            return recount.value == (self._meta("state_set") or LatticeHash().value)


# Every table the state root covers (blocks and meta are the chain itself, not its state).
_STATE_TABLES = (
    ("accounts", "key, available, bonded, nonce"),
    ("unbonding", "key, release_height, credits"),
    ("punished", "fault"),
    ("members", "member, account"),
    ("settlements", "payer, payee, settled, epoch"),
    ("epoch_stakes", "epoch, account, stake"),
    (
        "verdicts",
        "id, provider, provider_account, verifier, verifier_account, score_permille, status, "
        "recorded_height, deadline, evidence",
    ),
    ("jurors", "verdict, account, uphold"),
    ("duels", "id, organiser, winner, loser, recorded_height, result"),
    ("organisers", "key, duels"),
    ("candidates", "key, address"),
    ("committees", "epoch, key, address"),
)


# Every change to a state table logs the rows it added and removed, for the next root.
_TRIGGERS = "".join(
    f"""
CREATE TRIGGER IF NOT EXISTS {t}_inserted AFTER INSERT ON {t} BEGIN
    INSERT INTO state_changes (added, row) VALUES (1, {row_expression(t, c, "NEW.")});
END;
CREATE TRIGGER IF NOT EXISTS {t}_deleted AFTER DELETE ON {t} BEGIN
    INSERT INTO state_changes (added, row) VALUES (0, {row_expression(t, c, "OLD.")});
END;
CREATE TRIGGER IF NOT EXISTS {t}_updated AFTER UPDATE ON {t} BEGIN
    INSERT INTO state_changes (added, row)
    VALUES (0, {row_expression(t, c, "OLD.")}), (1, {row_expression(t, c, "NEW.")});
END;
"""
    for t, c in _STATE_TABLES
)


def _verdict_record(row: tuple[bytes, bytes, bytes, str, int, int, int]) -> VerdictRecord:
    identifier, provider, verifier, status, score, recorded, deadline = row
    return VerdictRecord(bytes(identifier), bytes(provider), bytes(verifier), status, score / 1000, recorded, deadline)
