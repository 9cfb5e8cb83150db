"""The credit ledger: signed, hash-chained entries per author, replicated by anti-entropy, with
balances derived from the log. See :mod:`swarmserve.ledger.replica` for the rules."""

from swarmserve.ledger.entries import GRANT_CREDITS, Entry, LedgerRejection, decode_entry, sign_entry
from swarmserve.ledger.replica import AcceptResult, Balance, LedgerReplica, VerifyReport

__all__ = [
    "GRANT_CREDITS",
    "AcceptResult",
    "Balance",
    "Entry",
    "LedgerRejection",
    "LedgerReplica",
    "VerifyReport",
    "decode_entry",
    "sign_entry",
]
