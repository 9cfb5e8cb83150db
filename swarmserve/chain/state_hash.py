"""The state root's accumulator: a multiset hash over every row of the state's tables, kept up to
date with the rows each block adds and removes, so a block's root costs what the block changed,
not what the state holds.

The hash is LtHash16 (Bellare-Micciancio's lattice hash as Facebook and Solana's accounts
lattice hash use it): each row is BLAKE3 of the row extended to 2,048 bytes, read as 1,024
16-bit lanes, and the set is the lane-wise sum of its rows modulo 2^16. Adding a row adds its
lanes, removing one subtracts them, in any order: two replicas holding the same rows hold the
same value, however they got there; finding two different sets with one sum is a short-vector
problem in a lattice of dimension 1,024. A block's changes are summed in one vectorized pass.

Rows arrive as text: the table's name and SQLite's ``quote()`` of each value, comma-separated
(:func:`row_expression`), which is unambiguous (strings quoted, blobs in hex) and computed by
SQLite itself, in the triggers that log every change.
"""

from __future__ import annotations

import numpy as np
from blake3 import blake3

__all__ = ["LANES", "LatticeHash", "row_expression"]

LANES = 1024
_DOMAIN = b"swarmserve-state-row-v1"


def row_expression(table: str, columns: str, prefix: str = "") -> str:
    """SQL for a row's text: ``prefix`` is ``NEW.``, ``OLD.`` (in a trigger) or empty."""
    values = " || ',' || ".join(f"quote({prefix}{column.strip()})" for column in columns.split(","))
    return f"'{table},' || {values}"


def _lanes(rows: list[bytes]) -> np.ndarray:
    if not rows:
        return np.zeros(LANES, dtype=np.uint16)
    expanded = b"".join(blake3(_DOMAIN + row).digest(length=2 * LANES) for row in rows)
    lanes: np.ndarray = np.frombuffer(expanded, dtype="<u2").reshape(len(rows), LANES).sum(axis=0, dtype=np.uint16)
    return lanes


class LatticeHash:
    """The lane-wise sum of a multiset of rows; ``value`` (2,048 bytes) names the set."""

    def __init__(self, value: bytes | None = None) -> None:
        self._lanes = np.frombuffer(value, dtype="<u2").copy() if value else np.zeros(LANES, dtype=np.uint16)

    def update(self, added: list[bytes], removed: list[bytes]) -> None:
        self._lanes += _lanes(added)  # uint16 lanes: modulo 2^16
        self._lanes -= _lanes(removed)

    @property
    def value(self) -> bytes:
        return self._lanes.astype("<u2").tobytes()
