"""The state root's multiset hash (swarmserve/chain/state_hash.py) alone: one value for one set
of rows whatever the order they came and went in; removing undoes adding; another set, a row
of another table with the same values, or a row repeated, gives another value."""

from __future__ import annotations

import random

from swarmserve.chain.state_hash import MultisetHash, encode_row

ROWS = [encode_row("accounts", bytes([i]) * 32, i * 7, i, 0) for i in range(40)]


def value(rows: list[bytes]) -> bytes:
    accumulator = MultisetHash()
    for row in rows:
        accumulator.add(row)
    return accumulator.value


def test_order_does_not_matter_and_removing_undoes_adding() -> None:
    shuffled = ROWS[:]
    random.Random(1).shuffle(shuffled)
    assert value(ROWS) == value(shuffled)
    accumulator = MultisetHash(value(ROWS[:30]))  # resumed from a stored value
    extra = encode_row("accounts", b"\xff" * 32, 1, 2, 3)
    accumulator.add(extra)
    for row in ROWS[30:]:
        accumulator.add(row)
    accumulator.remove(extra)
    assert accumulator.value == value(ROWS)
    emptied = MultisetHash(value(ROWS))
    for row in shuffled:
        emptied.remove(row)
    assert emptied.value == MultisetHash().value


def test_other_sets_give_other_values() -> None:
    assert value(ROWS) != value(ROWS[:-1])
    assert value(ROWS) != value([*ROWS, ROWS[0]])  # a multiset: a repeated row counts
    assert value([encode_row("accounts", b"k", 1)]) != value([encode_row("members", b"k", 1)])
    assert value([encode_row("t", b"ab", b"c")]) != value([encode_row("t", b"a", b"bc")])
    assert value([encode_row("t", 1)]) != value([encode_row("t", "1")])
