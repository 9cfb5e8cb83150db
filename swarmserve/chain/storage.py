"""How the chain's files are opened: SQLite in autocommit mode (callers open their own
transactions), WAL, and synchronous writes, so that whatever a node committed survives a crash."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_database"]


def open_database(path: Path | None, schema: str) -> sqlite3.Connection:
    """``path`` (created with its directory if missing; None: in memory) with ``schema`` applied.
    The connection may be used from several threads; callers serialise with their own lock."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
