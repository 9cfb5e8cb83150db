"""The state root's multiset hash (swarmserve/chain/state_hash.py) alone: one value for one set
of rows whatever the order they came and went in; removing undoes adding; another set, or a row
repeated, gives another value; rows are SQLite's quoting of the values, so no two rows read
alike."""

from __future__ import annotations

import random
import sqlite3

from swarmserve.chain.state_hash import LatticeHash, row_expression

ROWS = [f"accounts,X'{i:064X}',{i * 7},{i},0".encode() for i in range(40)]


def value(rows: list[bytes]) -> bytes:
    accumulator = LatticeHash()
    accumulator.update(rows, [])
    return accumulator.value


def test_order_does_not_matter_and_removing_undoes_adding() -> None:
    shuffled = ROWS[:]
    random.Random(1).shuffle(shuffled)
    assert value(ROWS) == value(shuffled)
    accumulator = LatticeHash(value(ROWS[:30]))  # resumed from a stored value
    extra = b"accounts,X'FF',1,2,3"
    accumulator.update([extra], [])
    accumulator.update(ROWS[30:], [extra])
    assert accumulator.value == value(ROWS)
    emptied = LatticeHash(value(ROWS))
    emptied.update([], shuffled)
    assert emptied.value == LatticeHash().value


def test_other_sets_give_other_values() -> None:
    assert value(ROWS) != value(ROWS[:-1])
    assert value(ROWS) != value([*ROWS, ROWS[0]])  # a multiset: a repeated row counts


def test_rows_are_unambiguous() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a, b)")
    tricky = [(b"ab", b"c"), (b"a", b"bc"), (1, None), ("1", None), ("x','y", "z"), ("x", "y','z"), (None, None)]
    db.executemany("INSERT INTO t VALUES (?, ?)", tricky)
    texts = [row for (row,) in db.execute(f"SELECT {row_expression('t', 'a, b')} FROM t")]
    assert len(set(texts)) == len(tricky), texts
    assert texts[0] == "t,X'6162',X'63'"
