"""The coordinator's durable state in SQLite: the job, nodes, committed rounds, every update's outcome, and
governance proposals and votes (one row each).

All SQL lives here, so another database (PostgreSQL for large deployments) can replace this one module.
Never commit a round without its checkpoint already on disk (see server/coordinator/checkpoint.py).
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
    last_path TEXT,
    name TEXT NOT NULL DEFAULT '',
    team TEXT NOT NULL DEFAULT ''
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
    ledger_head TEXT NOT NULL,
    signature TEXT NOT NULL DEFAULT '',
    bytes_sent INTEGER NOT NULL DEFAULT 0
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
    received_at REAL NOT NULL,
    quality_ppm INTEGER NOT NULL DEFAULT 0,
    aggregated INTEGER NOT NULL DEFAULT 0,
    committed_round INTEGER
);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates(round);
CREATE INDEX IF NOT EXISTS updates_by_node_round ON updates(node_id, round);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    id TEXT PRIMARY KEY,
    proposal TEXT NOT NULL,
    status TEXT NOT NULL,
    decided_round INTEGER,
    outcome TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS votes (
    proposal_id TEXT NOT NULL,
    voter TEXT NOT NULL,
    approve INTEGER NOT NULL,
    round INTEGER NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (proposal_id, voter)
);
"""

# Columns added after the first release, declared as in SCHEMA; an older database gains them when opened.
# Rows written before then keep the defaults: unsigned rounds, updates whose rewards cannot be recomputed, and
# nodes without a display name or team until they next say hello.
ADDED_COLUMNS = {
    "nodes": (("name", "TEXT NOT NULL DEFAULT ''"), ("team", "TEXT NOT NULL DEFAULT ''")),
    "rounds": (("signature", "TEXT NOT NULL DEFAULT ''"), ("bytes_sent", "INTEGER NOT NULL DEFAULT 0")),
    "updates": (("quality_ppm", "INTEGER NOT NULL DEFAULT 0"), ("aggregated", "INTEGER NOT NULL DEFAULT 0"),
                ("committed_round", "INTEGER")),
}
UPDATE_COLUMNS = ("round", "node_id", "accepted", "reason", "tokens", "inner_steps", "loss_first", "loss_last",
                  "bytes", "weight", "received_at", "quality_ppm", "aggregated", "committed_round")


class OutdatedSchema(Exception):
    """A database opened read-only was written by an older coordinator and lacks columns this version reads."""


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
    signature: str = ""  # the coordinator's, over shared.rewards.round_record_bytes(round, model_hash, ledger_head)
    bytes_sent: int = 0  # what the coordinator sent while the round was open: its links and its blobs


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
    quality_ppm: int = 0  # the update's measured quality, which its reward is computed from (0 when rejected)
    aggregated: bool = False  # the aggregator used it: an accepted, aggregated update is paid a reward
    committed_round: int | None = None  # the round record it was committed with (its reward's round); set by the
    # store on commit, None for records written before this column existed


class Store:
    """One SQLite database file. Safe to call from the event loop thread and worker threads (one lock).

    read_only opens an existing database without creating, migrating or writing anything (for auditing a
    data directory, perhaps while its coordinator runs); FileNotFoundError when there is none.
    """

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self._lock = threading.Lock()
        self._missing: dict[str, list[str]] = {}
        if read_only:
            if not path.exists():
                raise FileNotFoundError(f"no coordinator state at {path}")
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
            self._missing = self._missing_columns()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        for table, columns in self._missing_columns().items():
            declared = dict(ADDED_COLUMNS[table])
            for column in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declared[column]}")

    def _missing_columns(self) -> dict[str, list[str]]:
        missing = {}
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            absent = [name for name, _ in columns if name not in present]
            if present and absent:
                missing[table] = absent
        return missing

    def _require_columns(self, table: str) -> None:
        if table in self._missing:
            raise OutdatedSchema(f"{self.path} was written by an older coordinator: table {table} lacks "
                                 f"{', '.join(self._missing[table])}. Start the coordinator on it once to add "
                                 "them.")

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

    def touch_node(self, node_id: str, kind: str, agent: str = "", name: str = "", team: str = "") -> None:
        """A node said hello: record it, or its new session. `name` and `team` are those its latest (signed) hello
        carried, so a node that leaves them out clears them."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO nodes (id, kind, agent, first_seen, last_seen, name, team) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, agent = excluded.agent, "
                "name = excluded.name, team = excluded.team",
                (node_id, kind, agent, now, now, name, team),
            )

    def set_node_path(self, node_id: str, path: str) -> None:
        """The path (webrtc or websocket) the node's round traffic last used."""
        with self._lock:
            self._db.execute("UPDATE nodes SET last_path = ? WHERE id = ?", (path, node_id))

    def is_known_node(self, node_id: str) -> bool:
        """Whether the node was ever admitted (every admitted node's session is recorded in `nodes`)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None

    def nodes(self) -> list[dict]:
        """Every node ever admitted, oldest first. A read-only store of an older database reads them nameless."""
        named = "nodes" not in self._missing
        with self._lock:
            cur = self._db.execute(
                "SELECT id, kind, agent, first_seen, last_seen, updates_accepted, updates_rejected, tokens, last_path, "
                + ("name, team" if named else "'' AS name, '' AS team") + " FROM nodes ORDER BY first_seen"
            )
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def contributed_rounds(self) -> dict[str, int]:
        """Per node: how many rounds it had an update accepted for (nodes without one are left out)."""
        with self._lock:
            return dict(self._db.execute("SELECT node_id, COUNT(DISTINCT round) FROM updates WHERE accepted = 1 "
                                         "GROUP BY node_id").fetchall())

    def team_contributed_rounds(self) -> dict[str, int]:
        """Per team (nodes' current team, "" left out): how many rounds any member had an update accepted for."""
        if "nodes" in self._missing:  # a read-only store of an older database: no teams
            return {}
        with self._lock:
            return dict(self._db.execute(
                "SELECT nodes.team, COUNT(DISTINCT updates.round) FROM updates JOIN nodes ON nodes.id = updates.node_id "
                "WHERE updates.accepted = 1 AND nodes.team != '' GROUP BY nodes.team").fetchall())

    # -- rounds ------------------------------------------------------------------------------------------

    def commit_round(self, record: RoundRecord, updates: list[UpdateRecord], ledger: list[dict] = (),
                     balances: dict[str, int] | None = None, meta: dict | None = None,
                     proposals: list[dict] = ()) -> None:
        """Record a round with its updates, the nodes' counters, the ledger entries it caused, the balances after
        them, governance state (`meta`) and the proposals its boundary decided (`proposals`: id, status,
        decided_round, outcome), in one transaction: all or nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO rounds (round, model_hash, checkpoint, checkpoint_sha256, val_loss, accepted, "
                    "rejected, tokens, bytes_received, opened_at, closed_at, deadline, ledger_head, signature, "
                    "bytes_sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.round, record.model_hash, record.checkpoint, record.checkpoint_sha256, record.val_loss,
                     record.accepted, record.rejected, record.tokens, record.bytes_received, record.opened_at,
                     record.closed_at, record.deadline, record.ledger_head, record.signature, record.bytes_sent),
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
                for p in proposals:
                    self._db.execute("UPDATE proposals SET status = ?, decided_round = ?, outcome = ? WHERE id = ?",
                                     (p["status"], p["decided_round"], p["outcome"], p["id"]))
                for u in updates:
                    self._db.execute(
                        f"INSERT INTO updates ({', '.join(UPDATE_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(UPDATE_COLUMNS))})",
                        (u.round, u.node_id, int(u.accepted), u.reason, u.tokens, u.inner_steps, u.loss_first,
                         u.loss_last, u.bytes, u.weight, u.received_at, u.quality_ppm, int(u.aggregated),
                         record.round),
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
        """Every committed round, oldest first. A read-only store of an older database reads them unsigned."""
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

    def update_decided(self, node_id: str, round_: int) -> bool:
        """Whether an update of this node for this round (the round it was computed for) was ever committed."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM updates WHERE node_id = ? AND round = ? LIMIT 1",
                                   (node_id, round_)).fetchone()
        return row is not None

    def updates(self, round_: int | None = None) -> list[UpdateRecord]:
        """The update records computed for `round_` (all when None), in the order they were committed."""
        self._require_columns("updates")
        query = f"SELECT {', '.join(UPDATE_COLUMNS)} FROM updates"
        args: tuple = ()
        if round_ is not None:
            query += " WHERE round = ?"
            args = (round_,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [UpdateRecord(*r[:2], bool(r[2]), *r[3:12], bool(r[12]), r[13]) for r in rows]

    # -- proposals and votes: one row each, so accepting one is one INSERT ------------------------------------

    def add_proposal(self, state: dict) -> None:
        """A proposal as shared.governance.ProposalState.to_dict() writes it; its votes go in with add_vote."""
        with self._lock:
            self._insert_proposal(state)

    def add_vote(self, vote: dict) -> None:
        """A vote as shared.governance.Vote.to_dict() writes it."""
        with self._lock:
            self._insert_vote(vote)

    def proposals(self) -> list[dict]:
        """Every proposal with its votes, in shared.governance.ProposalState.to_dict()'s shape."""
        with self._lock:
            rows = self._db.execute("SELECT id, proposal, status, decided_round, outcome FROM proposals ORDER BY id")
            states = {pid: {"proposal": json.loads(proposal), "status": status, "votes": [],
                            "decided_round": decided_round, "outcome": outcome}
                      for pid, proposal, status, decided_round, outcome in rows.fetchall()}  # fmt: skip
            for proposal_id, voter, approve, round_, signature in self._db.execute(
                    "SELECT proposal_id, voter, approve, round, signature FROM votes ORDER BY proposal_id, voter"):
                states[proposal_id]["votes"].append({"proposal_id": proposal_id, "voter": voter,
                                                     "approve": bool(approve), "round": round_,
                                                     "signature": signature})  # fmt: skip
        return list(states.values())

    def import_proposals(self, states: list[dict], meta_key: str, meta_value: object) -> None:
        """Move proposals (with their votes) out of a meta blob into their tables: the rows and the blob without
        them (`meta_value`) are written in one transaction, so a crash leaves the one or the other."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for state in states:
                    self._insert_proposal(state, or_ignore=True)
                    for vote in state.get("votes", []):
                        self._insert_vote(vote, or_ignore=True)
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 (meta_key, json.dumps(meta_value)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _insert_proposal(self, state: dict, or_ignore: bool = False) -> None:
        proposal = state["proposal"]
        self._db.execute(f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO proposals "
                         "(id, proposal, status, decided_round, outcome) VALUES (?, ?, ?, ?, ?)",
                         (proposal["id"], json.dumps(proposal, sort_keys=True), state["status"],
                          state.get("decided_round"), state.get("outcome", "")))

    def _insert_vote(self, vote: dict, or_ignore: bool = False) -> None:
        self._db.execute(f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO votes "
                         "(proposal_id, voter, approve, round, signature) VALUES (?, ?, ?, ?, ?)",
                         (vote["proposal_id"], vote["voter"], int(vote["approve"]), vote["round"],
                          vote["signature"]))
