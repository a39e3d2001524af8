"""The coordinator's state in either database, with real processes: a job killed with SIGKILL mid-round resumes at
its last committed round with the votes it had taken, trains on under the change they passed, and its books pass
`ledger verify`, while the same books re-hashed and re-signed after an overpayment fail it. That job runs once on
SQLite and once on PostgreSQL (the `store_url` fixture; tests/postgres.py starts the server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest

from server.cli import main as server
from server.coordinator.store import Store, open_store
from server.keys import NodeKey
from shared.rewards import LedgerEntry, round_record_bytes
from tests.conftest import Coordinator
from tests.test_books import overpay, rewrite_books
from tests.test_rewards import reforge

TRAIN_ARGS = ("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "120")
VOTED_INNER_STEPS = 3
# every optimizer step of the trainers sleeps this long first, so a round stays open for at least two of them
# whatever the machine's speed: proposals and votes land inside one round, and the kill lands mid-round
STEP_FLOOR_S = 0.5


@pytest.fixture
def cli(capsys):
    """`python -m server ARGS` in this process (the commands that neither serve nor train): (status, out, err)."""
    def run(*args: str) -> tuple[int, str, str]:
        code = server(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def books_of(coordinator: Coordinator) -> Store:
    """The coordinator's state as an auditor reads it: read-only, from whichever database it keeps it in."""
    return open_store(coordinator.store or coordinator.data_dir / "state.db", read_only=True)


def verify_args(data_dir: Path, store: str | None) -> list[str]:
    return ["ledger", "verify", "--data-dir", str(data_dir), *(["--store", store] if store else [])]


def rewrite_postgres_books(url: str, edit, sign_with: NodeKey) -> None:
    """tests.test_books.rewrite_books, done to a PostgreSQL store: the ledger edited and re-hashed, the balance
    table and every round's head rewritten to match, each round record re-signed by `sign_with`."""
    with psycopg.connect(url) as db:  # one transaction, committed on leaving
        rows = db.execute("SELECT entry FROM ledger ORDER BY seq").fetchall()
        entries = [LedgerEntry.from_dict(json.loads(r[0])) for r in rows]
        old_hashes = [e.hash for e in entries]
        forged = reforge(edit(entries))
        db.execute("DELETE FROM ledger")
        for e in forged.entries:
            db.execute("INSERT INTO ledger (seq, round, node, kind, hash, entry) VALUES (%s, %s, %s, %s, %s, %s)",
                       (e.seq, e.round, e.node, e.kind, e.hash, json.dumps(e.to_dict(), sort_keys=True)))
        db.execute("DELETE FROM balances")
        for account, amount in forged.balances().items():
            db.execute("INSERT INTO balances (account, amount) VALUES (%s, %s)", (account, amount))
        for round_, model_hash, head in db.execute("SELECT round, model_hash, ledger_head FROM rounds").fetchall():
            if head in old_hashes:
                head = forged.entries[min(old_hashes.index(head), len(forged.entries) - 1)].hash
            db.execute("UPDATE rounds SET ledger_head = %s, signature = %s WHERE round = %s",
                       (head, sign_with.sign(round_record_bytes(round_, model_hash, head)), round_))


def forged_copy(coordinator: Coordinator, tmp_path: Path, sign_with: NodeKey) -> tuple[Path, str | None]:
    """A copy of the stopped coordinator's data directory and store with the first reward overpaid, the chain
    re-hashed and every round re-signed: (data directory, store URL or None for SQLite)."""
    copy = tmp_path / "forged"
    shutil.copytree(coordinator.data_dir, copy)
    if coordinator.store is None:
        rewrite_books(copy / "state.db", overpay, sign_with=sign_with)
        return copy, None
    source = coordinator.store.rpartition("/")[2]
    with psycopg.connect(coordinator.store.rpartition("/")[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {source}_forged TEMPLATE {source}")  # needs the coordinator gone
    url = f"{coordinator.store}_forged"
    rewrite_postgres_books(url, overpay, sign_with)
    return copy, url


def test_a_job_killed_mid_round_resumes_with_its_votes_and_its_books_verify_until_edited(
        processes, loopback_namespace, tmp_path, store_url, cli):  # fmt: skip
    data_dir = tmp_path / "data"
    first = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url)
    first.wait_ready()
    keys = [tmp_path / "a.key", tmp_path / "b.key"]
    trainers = [processes.trainer(first.url, "--transport", "websocket", "--key-file", str(k),
                                  min_step_seconds=STEP_FLOOR_S) for k in keys]  # fmt: skip
    first.wait_for(lambda s: s["round"] >= 1, 180, "a round that earns both trainers reputation")

    code, out, err = cli("governance", "propose", "--coordinator", first.url, "--key-file", str(keys[0]),
                         "--set-param", f"inner_steps={VOTED_INNER_STEPS}")
    assert code == 0, err
    proposal_id = out.split()[1]
    for key in keys:
        code, _, err = cli("governance", "vote", "--coordinator", first.url, "--key-file", str(key), proposal_id, "yes")
        assert code == 0, err
    first.kill()  # SIGKILL, with a round open: no shutdown code runs

    books = books_of(first)
    committed = books.last_round()
    (stored,) = books.proposals()
    books.close()
    assert committed.round >= 1
    assert stored["proposal"]["id"] == proposal_id  # durable as each was accepted, before any round committed
    assert {v["voter"] for v in stored["votes"]} == {NodeKey.load_or_create(k).node_id for k in keys}

    second = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url, port=first.port)
    resumed = second.wait_ready()
    assert (resumed["round"], resumed["model_hash"]) == (committed.round, committed.model_hash)
    status = second.wait_for(
        lambda s: s["job"]["inner_steps"] == VOTED_INNER_STEPS and s["round"] >= committed.round + 2, 240,
        "the voted change and two more rounds after the restart")
    rounds = [h["round"] for h in status["history"]]
    assert rounds == list(range(len(rounds))), rounds  # no lost and no repeated round
    assert all(t.proc.poll() is None for t in trainers)  # both trainers reconnected and trained on
    second.stop()

    books = books_of(second)
    (applied,) = books.proposals()
    steps = {(u.round, u.inner_steps) for u in books.updates() if u.accepted and u.round >= applied["decided_round"]}
    books.close()
    assert applied["status"] == "applied" and applied["decided_round"] > committed.round - 1
    assert steps and {h for _, h in steps} == {VOTED_INNER_STEPS}
    code, out, err = cli(*verify_args(data_dir, store_url))
    assert code == 0, err
    assert "ledger intact" in out and f"{len(rounds)} round records signed" in out

    coordinator_key = NodeKey.load_or_create(data_dir / "coordinator.key")
    code, _, err = cli(*verify_args(*forged_copy(second, tmp_path, sign_with=coordinator_key)))
    assert code == 1 and "does not follow the formula" in err, err


def test_serve_and_ledger_verify_name_an_unreachable_or_empty_store_and_create_nothing(postgres_server, tmp_path,
                                                                                       cli):
    unreachable = postgres_server.url("no_such_database")
    code, _, err = cli("--data-dir", str(tmp_path / "data"), "--store", unreachable)
    assert code == 2 and "cannot open the PostgreSQL store" in err and "no_such_database" in err, err
    empty = postgres_server.new_database()
    code, _, err = cli("ledger", "balances", "--store", empty)
    assert code == 2 and "no coordinator state in" in err, err
    code, _, err = cli(*verify_args(tmp_path / "data", empty))
    assert code == 2 and "no coordinator state in" in err, err
    with psycopg.connect(empty) as db:
        assert db.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone() \
            == (0,)
