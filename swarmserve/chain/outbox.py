"""A node's own transactions, from signing until the chain consumes their nonces.

Why it exists: a transaction is void unless its nonce is its key's next (``state.py``), and a
node's transactions reach the block proposers through different validators and best-effort
gossip, so nonce n+1 can be finalized before nonce n: it is void, and every mempool drops it
with the block. Under load that lost verdicts and appeals (an honest node's appeal voided, its
FAIL then upheld unheard). So each transaction is held here until the chain has consumed its
nonce, and sent again, the same bytes, while it has not: once its predecessor applies, it does.

Invariants: nonces are handed out in order, one past the highest of the key's applied nonce and
those held, so the held ones are contiguous above the applied one; a transaction leaves only when
the applied nonce reaches it (applied or failed: both consume the nonce; a resent copy of a
consumed one is void and harmless); at most ``capacity`` are held (then signing refuses: the
chain is not keeping up, and callers must not queue without bound). One key signs from one
process: a copy elsewhere would consume these nonces with other transactions.

Pure logic (the clock is passed in); ``ChainReplica`` sends what :meth:`Outbox.due` returns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from google.protobuf.message import Message

from swarmserve import native
from swarmserve.chain.transactions import sign_transaction
from swarmserve.rpc import ResourceExhausted

__all__ = ["Outbox"]


@dataclass
class _Held:
    raw: bytes
    sent_at: float  # monotonic


class Outbox:
    def __init__(
        self, identity: native.Identity, chain_id: bytes, *, capacity: int = 1024, resend_after_s: float = 1.0
    ) -> None:
        self._identity = identity
        self._chain_id = chain_id
        self._capacity = capacity
        self._resend_after_s = resend_after_s
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()  # the applying thread signs equivocation evidence too

    def __len__(self) -> int:
        return len(self._held)

    def sign(self, applied: int, now: float, **action: Message) -> bytes:
        """``action`` signed with the next nonce above ``applied`` (the key's applied nonce) and
        every held one, to be sent ``now`` by the caller; held until that nonce is consumed.
        Raises ResourceExhausted when full."""
        with self._lock:
            self._forget(applied)
            if len(self._held) >= self._capacity:
                raise ResourceExhausted(
                    f"{len(self._held)} transactions of this node wait for the chain; try again later"
                )
            nonce = max([applied, *self._held]) + 1
            raw = sign_transaction(self._identity, self._chain_id, nonce, **action)
            self._held[nonce] = _Held(raw, now)
            return raw

    def due(self, applied: int, now: float) -> list[bytes]:
        """The held transactions to send again now, in nonce order: those not consumed by
        ``applied`` and not sent in the last ``resend_after_s``. Marks them sent."""
        with self._lock:
            self._forget(applied)
            due = []
            for nonce in sorted(self._held):
                held = self._held[nonce]
                if now - held.sent_at >= self._resend_after_s:
                    held.sent_at = now
                    due.append(held.raw)
            return due

    def _forget(self, applied: int) -> None:
        for nonce in [n for n in self._held if n <= applied]:
            del self._held[nonce]
