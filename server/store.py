"""The coordinator's durable state in SQLite: the job, nodes, committed rounds and every update's outcome.

All SQL lives here, so another database (PostgreSQL for large deployments) can replace this one module.
Never commit a round without its checkpoint already on disk (see server/checkpoint.py).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    agent TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    updates_accepted INTEGER NOT NULL DEFAULT 0,
    updates_rejected INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    last_path TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model_hash TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    val_loss REAL,
    accepted INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL NOT NULL,
    deadline REAL NOT NULL,
    ledger_head TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    inner_steps INTEGER NOT NULL,
    loss_first REAL,
    loss_last REAL,
    bytes INTEGER NOT NULL,
    weight REAL NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates(round);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    model_hash: str
    checkpoint: str
    checkpoint_sha256: str
    val_loss: float | None
    accepted: int
    rejected: int
    tokens: int
    bytes_received: int
    opened_at: float
    closed_at: float
    deadline: float
    ledger_head: str  # hash of the last ledger entry committed with this round: anchors the chain


@dataclass(frozen=True)
class UpdateRecord:
    round: int  # the round the update was computed for
    node_id: str
    accepted: bool
    reason: str
    tokens: int
    inner_steps: int
    loss_first: float | None
    loss_last: float | None
    bytes: int
    weight: float
    received_at: float


class Store:
    """One SQLite database file. Safe to call from the event loop thread and worker threads (one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- job ---------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> object | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: object) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- nodes -------------------------------------------------------------------------------------------

    def touch_node(self, node_id: str, kind: str, agent: str = "") -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO nodes (id, kind, agent, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, agent = excluded.agent",
                (node_id, kind, agent, now, now),
            )

    def set_node_path(self, node_id: str, path: str) -> None:
        """The path (webrtc or websocket) the node's round traffic last used."""
        with self._lock:
            self._db.execute("UPDATE nodes SET last_path = ? WHERE id = ?", (path, node_id))

    def nodes(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute(
                "SELECT id, kind, agent, first_seen, last_seen, updates_accepted, updates_rejected, tokens, last_path "
                "FROM nodes ORDER BY first_seen"
            )
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    # -- rounds ------------------------------------------------------------------------------------------

    def commit_round(self, record: RoundRecord, updates: list[UpdateRecord], ledger: list[dict] = (),
                     balances: dict[str, int] | None = None, meta: dict | None = None) -> None:
        """Record a round with its updates, the nodes' counters, the ledger entries it caused, the balances after
        them and governance state (`meta`), in one transaction: all or nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.round, record.model_hash, record.checkpoint, record.checkpoint_sha256, record.val_loss,
                     record.accepted, record.rejected, record.tokens, record.bytes_received, record.opened_at,
                     record.closed_at, record.deadline, record.ledger_head),
                )
                for e in ledger:
                    self._db.execute("INSERT INTO ledger (seq, round, node, kind, hash, entry) VALUES (?, ?, ?, ?, ?, ?)",
                                     (e["seq"], e["round"], e["node"], e["kind"], e["hash"],
                                      json.dumps(e, sort_keys=True)))
                if balances is not None:
                    self._db.execute("DELETE FROM balances")
                    self._db.executemany("INSERT INTO balances (account, amount) VALUES (?, ?)", balances.items())
                for key, value in (meta or {}).items():
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
                for u in updates:
                    self._db.execute(
                        "INSERT INTO updates (round, node_id, accepted, reason, tokens, inner_steps, loss_first, "
                        "loss_last, bytes, weight, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (u.round, u.node_id, int(u.accepted), u.reason, u.tokens, u.inner_steps, u.loss_first,
                         u.loss_last, u.bytes, u.weight, u.received_at),
                    )
                    column = "updates_accepted" if u.accepted else "updates_rejected"
                    self._db.execute(
                        f"UPDATE nodes SET {column} = {column} + 1, tokens = tokens + ? WHERE id = ?",
                        (u.tokens if u.accepted else 0, u.node_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def last_round(self) -> RoundRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else RoundRecord(*row)

    def rounds(self) -> list[RoundRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds ORDER BY round").fetchall()
        return [RoundRecord(*r) for r in rows]

    def ledger_entries(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT entry FROM ledger ORDER BY seq").fetchall()
        return [json.loads(r[0]) for r in rows]

    def balances(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT account, amount FROM balances ORDER BY account").fetchall())

    def updates(self, round_: int | None = None) -> list[UpdateRecord]:
        query = ("SELECT round, node_id, accepted, reason, tokens, inner_steps, loss_first, loss_last, bytes, weight,"
                 " received_at FROM updates")
        args: tuple = ()
        if round_ is not None:
            query += " WHERE round = ?"
            args = (round_,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [UpdateRecord(r[0], r[1], bool(r[2]), *r[3:]) for r in rows]
