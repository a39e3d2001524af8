"""The store's SQLite database: one file in the data directory, the embedded default, opened for the coordinator
(created and migrated) or read-only for an audit.

Only what differs between databases lives here: connecting, column types, transactions, introspection. Never write
one of the store's queries here: server/coordinator/store.py writes each once, for SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# store.SCHEMA's column types in SQLite's words
TYPES = {"int": "INTEGER", "real": "REAL", "text": "TEXT", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}


class SqliteDatabase:
    """One SQLite file with autocommit statements and explicit transactions. Not thread-safe on its own: the Store
    calls it under its lock."""

    types = TYPES
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self.where = str(path)
        if read_only:
            if not path.exists():
                raise FileNotFoundError(f"no coordinator state at {path}")
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed round survives a power cut, as in PostgreSQL

    def execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[tuple]) -> None:
        self._db.executemany(sql, rows)

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: Iterable[tuple]) -> None:
        """Many rows into one table."""
        self._db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                             rows)

    def create(self, schema: str) -> None:
        self._db.executescript(schema)

    def columns(self, table: str) -> set[str]:
        """The table's column names; empty when there is no such table."""
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction that takes the write lock at once, so it never fails halfway for a busy file."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every read inside sees the same committed state (WAL keeps it while writers go on)."""
        self._db.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
