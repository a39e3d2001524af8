"""The coordinator's durable state: the job, nodes, committed rounds, every update's outcome, the ledger, and
governance proposals and votes (one row each), in SQLite (the embedded default) or PostgreSQL (`open_store`).

Every query is written here once, for both databases; store_sqlite.py and store_postgres.py hold only what differs
(types, placeholders, transactions). Never commit a round without its checkpoint already on disk (checkpoint.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# StoreUnavailable is open_store's error; callers import it from here
from server.coordinator.store_postgres import PostgresDatabase, StoreUnavailable, is_postgres_url  # noqa: F401
from server.coordinator.store_sqlite import SqliteDatabase

# Column types are named by kind ({int}, {real}, {text}, {serial}: an auto-numbered key) and spelled by each
# database (store_sqlite.TYPES, store_postgres.TYPES): one schema, the same in both
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key {text} PRIMARY KEY, value {text} NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id {text} PRIMARY KEY,
    kind {text} NOT NULL,
    agent {text} NOT NULL DEFAULT '',
    first_seen {real} NOT NULL,
    last_seen {real} NOT NULL,
    updates_accepted {int} NOT NULL DEFAULT 0,
    updates_rejected {int} NOT NULL DEFAULT 0,
    tokens {int} NOT NULL DEFAULT 0,
    last_path {text},
    name {text} NOT NULL DEFAULT '',
    team {text} NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    round {int} PRIMARY KEY,
    model_hash {text} NOT NULL,
    checkpoint {text} NOT NULL,
    checkpoint_sha256 {text} NOT NULL,
    val_loss {real},
    accepted {int} NOT NULL,
    rejected {int} NOT NULL,
    tokens {int} NOT NULL,
    bytes_received {int} NOT NULL,
    opened_at {real} NOT NULL,
    closed_at {real} NOT NULL,
    deadline {real} NOT NULL,
    ledger_head {text} NOT NULL,
    signature {text} NOT NULL DEFAULT '',
    bytes_sent {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    id {serial},
    round {int} NOT NULL,
    node_id {text} NOT NULL,
    accepted {int} NOT NULL,
    reason {text} NOT NULL,
    tokens {int} NOT NULL,
    inner_steps {int} NOT NULL,
    loss_first {real},
    loss_last {real},
    bytes {int} NOT NULL,
    weight {real} NOT NULL,
    received_at {real} NOT NULL,
    quality_ppm {int} NOT NULL DEFAULT 0,
    aggregated {int} NOT NULL DEFAULT 0,
    committed_round {int}
);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates(round);
CREATE INDEX IF NOT EXISTS updates_by_node_round ON updates(node_id, round);
CREATE TABLE IF NOT EXISTS ledger (
    seq {int} PRIMARY KEY,
    round {int} NOT NULL,
    node {text} NOT NULL,
    kind {text} NOT NULL,
    hash {text} NOT NULL UNIQUE,
    entry {text} NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (account {text} PRIMARY KEY, amount {int} NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    id {text} PRIMARY KEY,
    proposal {text} NOT NULL,
    status {text} NOT NULL,
    decided_round {int},
    outcome {text} NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS votes (
    proposal_id {text} NOT NULL,
    voter {text} NOT NULL,
    approve {int} NOT NULL,
    round {int} NOT NULL,
    signature {text} NOT NULL,
    PRIMARY KEY (proposal_id, voter)
);
"""

# Columns added after the first release, declared as in SCHEMA; an older database gains them when opened.
# Rows written before then keep the defaults: unsigned rounds, updates whose rewards cannot be recomputed, and
# nodes without a display name or team until they next say hello.
ADDED_COLUMNS = {
    "nodes": (("name", "{text} NOT NULL DEFAULT ''"), ("team", "{text} NOT NULL DEFAULT ''")),
    "rounds": (("signature", "{text} NOT NULL DEFAULT ''"), ("bytes_sent", "{int} NOT NULL DEFAULT 0")),
    "updates": (("quality_ppm", "{int} NOT NULL DEFAULT 0"), ("aggregated", "{int} NOT NULL DEFAULT 0"),
                ("committed_round", "{int}")),
}
ROUND_COLUMNS = ("round", "model_hash", "checkpoint", "checkpoint_sha256", "val_loss", "accepted", "rejected",
                 "tokens", "bytes_received", "opened_at", "closed_at", "deadline", "ledger_head", "signature",
                 "bytes_sent")
# an upsert both databases spell alike (SQLite since 3.24)
UPSERT_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
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


def open_store(location: Path | str, read_only: bool = False) -> Store:
    """The store at `location`: a postgresql:// (or postgres://) URL, else the path of a SQLite file.

    StoreUnavailable when a PostgreSQL server cannot be reached or refuses the connection."""
    return Store(location, read_only)


def driver_errors() -> tuple[type[Exception], ...]:
    """What the database drivers raise (for a command line that reports them before it knows which it opened)."""
    import sqlite3

    try:
        import psycopg
    except ImportError:  # an install without the PostgreSQL driver
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


class Store:
    """The coordinator's state in one database: a SQLite file (a path) or a PostgreSQL database (a postgresql://
    URL). Safe to call from the event loop thread and worker threads (one lock).

    read_only opens an existing store without creating, migrating or writing anything (for auditing a data
    directory or a database, perhaps while its coordinator runs); FileNotFoundError when there is none.
    """

    def __init__(self, location: Path | str, read_only: bool = False):
        self._lock = threading.RLock()  # reentrant: reads inside snapshot() take it again
        self._missing: dict[str, list[str]] = {}
        self._in_snapshot = False
        if is_postgres_url(location):
            self._db: SqliteDatabase | PostgresDatabase = PostgresDatabase(str(location), read_only)
        else:
            self._db = SqliteDatabase(Path(location), read_only)
        self.path = self._db.path  # the SQLite file's Path, or the PostgreSQL URL without its password
        self.errors = self._db.errors  # what the database driver raises (for a command line to report)
        if read_only:
            self._missing = self._missing_columns()
            return
        self._db.create(SCHEMA.format(**self._db.types))
        for table, columns in self._missing_columns().items():
            declared = dict(ADDED_COLUMNS[table])
            for column in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declared[column].format(**self._db.types)}")

    def _missing_columns(self) -> dict[str, list[str]]:
        missing = {}
        for table, columns in ADDED_COLUMNS.items():
            present = self._db.columns(table)
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

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state, though the coordinator commits rounds meanwhile (an audit). A
        snapshot taken inside another is that one."""
        with self._lock:
            if self._in_snapshot:
                yield
                return
            self._in_snapshot = True
            try:
                with self._db.snapshot():
                    yield
            finally:
                self._in_snapshot = False

    # -- job ---------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> object | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: object) -> None:
        with self._lock:
            self._db.execute(UPSERT_META, (key, json.dumps(value)))

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
        with self._lock, self._db.transaction():
            self._db.execute(f"INSERT INTO rounds ({', '.join(ROUND_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(ROUND_COLUMNS))})",
                             tuple(getattr(record, column) for column in ROUND_COLUMNS))
            self._db.insert_rows("ledger", ("seq", "round", "node", "kind", "hash", "entry"),
                                 [(e["seq"], e["round"], e["node"], e["kind"], e["hash"], json.dumps(e, sort_keys=True))
                                  for e in ledger])  # fmt: skip
            if balances is not None:
                self._db.execute("DELETE FROM balances")
                self._db.insert_rows("balances", ("account", "amount"), list(balances.items()))
            self._db.executemany(UPSERT_META, [(key, json.dumps(value)) for key, value in (meta or {}).items()])
            self._db.executemany("UPDATE proposals SET status = ?, decided_round = ?, outcome = ? WHERE id = ?",
                                 [(p["status"], p["decided_round"], p["outcome"], p["id"]) for p in proposals])
            self._db.insert_rows(
                "updates", UPDATE_COLUMNS,
                [(u.round, u.node_id, int(u.accepted), u.reason, u.tokens, u.inner_steps, u.loss_first, u.loss_last,
                  u.bytes, u.weight, u.received_at, u.quality_ppm, int(u.aggregated), record.round) for u in updates])
            self._db.executemany("UPDATE nodes SET updates_accepted = updates_accepted + ?, "
                                 "updates_rejected = updates_rejected + ?, tokens = tokens + ? WHERE id = ?",
                                 [(int(u.accepted), int(not u.accepted), u.tokens if u.accepted else 0, u.node_id)
                                  for u in updates])  # fmt: skip

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
        with self._lock, self._db.transaction():
            for state in states:
                self._insert_proposal(state, or_ignore=True)
                for vote in state.get("votes", []):
                    self._insert_vote(vote, or_ignore=True)
            self._db.execute(UPSERT_META, (meta_key, json.dumps(meta_value)))

    def _insert_proposal(self, state: dict, or_ignore: bool = False) -> None:
        proposal = state["proposal"]
        self._db.execute("INSERT INTO proposals (id, proposal, status, decided_round, outcome) VALUES (?, ?, ?, ?, ?)"
                         + (" ON CONFLICT DO NOTHING" if or_ignore else ""),
                         (proposal["id"], json.dumps(proposal, sort_keys=True), state["status"],
                          state.get("decided_round"), state.get("outcome", "")))

    def _insert_vote(self, vote: dict, or_ignore: bool = False) -> None:
        self._db.execute("INSERT INTO votes (proposal_id, voter, approve, round, signature) VALUES (?, ?, ?, ?, ?)"
                         + (" ON CONFLICT DO NOTHING" if or_ignore else ""),
                         (vote["proposal_id"], vote["voter"], int(vote["approve"]), vote["round"],
                          vote["signature"]))
