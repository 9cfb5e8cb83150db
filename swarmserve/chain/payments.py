"""Paying for served work with cheques (see :mod:`swarmserve.chain.cheques`), both ends:

- the payer's :class:`ChequeBook` adds what each request cost to the payee's cumulative total
  and signs a new cheque; the totals are durable, so a restarted payer never signs less than it
  already promised (that cheque would be worthless to the payee, who keeps the largest);
- the payee's :class:`ChequeInbox` keeps the largest cheque of each payer and what each payer
  owes by the payee's own count, so a provider can refuse a payer whose cheques stopped coming
  (:meth:`ChequeInbox.unpaid`), and hands the chain each new cheque once per epoch
  (:meth:`ChequeInbox.due`).

Both sides price a request with :func:`price_credits`, from quantities the payer checked
itself: the tokens it received (the receipt's commitment covers exactly those) and at most
as many prompt tokens as the prompt it sent can have.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

from swarmserve import native
from swarmserve.chain.cheques import ChequeError, OpenCheque, open_cheque, sign_cheque
from swarmserve.chain.state import ChainState
from swarmserve.chain.storage import open_database
from swarmserve.v1 import chain_pb2, common_pb2

__all__ = ["ChequeBook", "ChequeInbox", "most_prompt_tokens", "price_credits", "tokens_for"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (payee BLOB PRIMARY KEY, cumulative INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS received (
    payer BLOB PRIMARY KEY,
    cheque BLOB NOT NULL,
    cumulative INTEGER NOT NULL,
    owed INTEGER NOT NULL
) WITHOUT ROWID;
"""


def price_credits(price: common_pb2.Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Credits for one request at ``price`` (per 1,000 tokens), rounded up, at least 1."""
    owed = (
        prompt_tokens * price.credits_per_1k_prompt_tokens + completion_tokens * price.credits_per_1k_completion_tokens
    )
    return max(1, math.ceil(owed / 1000))


def tokens_for(credits: int, credits_per_token: int) -> int:
    """How many payment tokens of ``credits_per_token`` each pay ``credits``."""
    return math.ceil(credits / credits_per_token) if credits > 0 else 0


def most_prompt_tokens(prompt_bytes: int, messages: int) -> int:
    """The most prompt tokens a prompt of this many UTF-8 bytes can become: a token is at least a
    byte, plus the chat template's few tokens per message and the sequence's own."""
    return prompt_bytes + 8 * messages + 16


class _Store:
    def __init__(self, path: Path | None) -> None:
        self.db = open_database(path, _SCHEMA)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()


class ChequeBook:
    """The payer's side (thread-safe)."""

    def __init__(self, path: Path | None, identity: native.Identity, chain_id: bytes) -> None:
        self._store = _Store(path)
        self._identity = identity
        self._chain_id = chain_id

    def pay(self, payee: bytes, credits: int) -> chain_pb2.SignedCheque:
        """Adds ``credits`` to what this node owes ``payee``; returns the cheque for the new total."""
        if credits < 1:
            raise ValueError("a payment is for at least one credit")
        with self._store.lock:
            row = self._store.db.execute("SELECT cumulative FROM issued WHERE payee = ?", (payee,)).fetchone()
            cumulative = (row[0] if row else 0) + credits
            self._store.db.execute(
                "INSERT OR REPLACE INTO issued (payee, cumulative) VALUES (?, ?)", (payee, cumulative)
            )
        return sign_cheque(self._identity, self._chain_id, payee, cumulative)

    def issued(self, payee: bytes) -> int:
        with self._store.lock:
            row = self._store.db.execute("SELECT cumulative FROM issued WHERE payee = ?", (payee,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self._store.close()


class ChequeInbox:
    """The payee's side (thread-safe)."""

    def __init__(self, path: Path | None, payee: bytes, chain_id: bytes) -> None:
        self._store = _Store(path)
        self._payee = payee
        self._chain_id = chain_id

    def deposit(self, signed: chain_pb2.SignedCheque) -> int:
        """Keeps the cheque if it promises more than the payer's last; returns by how much (0 for
        a stale or repeated one). Raises :class:`ChequeError` for a bad cheque or another payee's."""
        cheque = open_cheque(signed, self._chain_id)
        if cheque.payee != self._payee:
            raise ChequeError("the cheque is made out to another node")
        with self._store.lock:
            row = self._store.db.execute("SELECT cumulative FROM received WHERE payer = ?", (cheque.payer,)).fetchone()
            if row is not None and row[0] >= cheque.cumulative:
                return 0
            self._store.db.execute(
                "INSERT INTO received (payer, cheque, cumulative, owed) VALUES (?, ?, ?, 0) "
                "ON CONFLICT (payer) DO UPDATE SET cheque = excluded.cheque, cumulative = excluded.cumulative",
                (cheque.payer, signed.SerializeToString(), cheque.cumulative),
            )
            return cheque.cumulative - (row[0] if row else 0)

    def served(self, payer: bytes, credits: int) -> None:
        """Counts work served to ``payer`` (at this node's price, by its own count)."""
        with self._store.lock:
            self._store.db.execute(
                "INSERT INTO received (payer, cheque, cumulative, owed) VALUES (?, x'', 0, ?) "
                "ON CONFLICT (payer) DO UPDATE SET owed = owed + excluded.owed",
                (payer, credits),
            )

    def unpaid(self, payer: bytes) -> int:
        """Credits served to ``payer`` that its cheques do not cover (yet)."""
        with self._store.lock:
            row = self._store.db.execute("SELECT owed - cumulative FROM received WHERE payer = ?", (payer,)).fetchone()
        return max(0, row[0]) if row else 0

    def due(self, state: ChainState) -> list[OpenCheque]:
        """Cheques that would pay something if settled now: more than the chain settled for the
        pair, and not settled in the current epoch yet."""
        epoch = state.epoch_of(state.height + 1)
        with self._store.lock:
            rows = self._store.db.execute("SELECT cheque FROM received WHERE cumulative > 0 ORDER BY payer").fetchall()
        due = []
        for (raw,) in rows:
            try:
                cheque = open_cheque(chain_pb2.SignedCheque.FromString(raw), self._chain_id)
            except ChequeError:
                continue
            settled, last_epoch = state.settled(cheque.payer, cheque.payee)
            if cheque.cumulative > settled and last_epoch < epoch:
                due.append(cheque)
        return due

    def close(self) -> None:
        self._store.close()
