"""The state root's accumulator: a multiset hash over every row of the state's tables, kept up to
date row by row as blocks change the state, so a block's root costs what the block changed, not
what the state holds (rehashing every row per block took 245 ms a block at 10,000 providers).

The hash is MuHash (as Bitcoin's UTXO-set hash): each row maps to a number modulo the prime
2^3072 - 1103717 (BLAKE3 of the row, extended to 384 bytes), and the set to the product of its
rows' numbers. Adding a row multiplies by its number, removing one divides by it, in any order:
two replicas holding the same rows hold the same value, however they got there. Finding two
different sets with one product is a discrete-logarithm problem in that group. Numerator and
denominator are kept apart while a block applies, so a block costs one modular inverse.

A row is its table's name and its values, each encoded with a type tag and, for strings and
bytes, a length (:func:`encode_row`), so no row of one table reads as a row of another.
"""

from __future__ import annotations

from blake3 import blake3

__all__ = ["PRIME", "MultisetHash", "encode_row"]

PRIME = 2**3072 - 1103717
_BYTES = 384


def encode_row(table: str, *values: object) -> bytes:
    return b"".join(_canonical(v) for v in (table, *values))


def _canonical(value: object) -> bytes:
    if value is None:
        return b"n"
    if isinstance(value, int):
        return b"i" + value.to_bytes(8, "big", signed=True)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise TypeError(f"a state row holds ints, strings and bytes, not {type(value).__name__}")
    return b"b" + len(value).to_bytes(4, "big") + value


def _element(row: bytes) -> int:
    value = int.from_bytes(blake3(b"swarmserve-state-row-v1" + row).digest(length=_BYTES), "big") % PRIME
    return value or 1


class MultisetHash:
    """The product of the rows' numbers: ``value`` (384 bytes) names the set."""

    def __init__(self, value: bytes | None = None) -> None:
        self._numerator = int.from_bytes(value, "big") if value else 1
        self._denominator = 1

    def add(self, row: bytes) -> None:
        self._numerator = self._numerator * _element(row) % PRIME

    def remove(self, row: bytes) -> None:
        self._denominator = self._denominator * _element(row) % PRIME

    @property
    def value(self) -> bytes:
        if self._denominator != 1:
            self._numerator = self._numerator * pow(self._denominator, -1, PRIME) % PRIME
            self._denominator = 1
        return self._numerator.to_bytes(_BYTES, "big")
