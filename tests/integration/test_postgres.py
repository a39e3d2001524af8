"""The coordinator's state in either database, with real processes: a job killed with SIGKILL mid-round resumes at
its last committed round with the votes it had taken, trains on under the change they passed, and its books pass
`ledger verify`, while the same books re-hashed and re-signed after an overpayment fail it. That job runs once on
SQLite and once on PostgreSQL (the `store_url` fixture; tests/postgres.py starts the server)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from server.cli import main as server
from server.keys import NodeKey
from tests.integration.forgery import forged_copy
from tests.test_books import overpay

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


def verify_args(data_dir: Path, store: str | None) -> list[str]:
    return ["ledger", "verify", "--data-dir", str(data_dir), *(["--store", store] if store else [])]


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

    with first.read_store() as books:
        committed = books.last_round()
        (stored,) = books.proposals()
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

    with second.read_store() as books:
        (applied,) = books.proposals()
        steps = {(u.round, u.inner_steps) for u in books.updates()
                 if u.accepted and u.round >= applied["decided_round"]}
    assert applied["status"] == "applied" and applied["decided_round"] > committed.round - 1
    assert steps and {h for _, h in steps} == {VOTED_INNER_STEPS}
    code, out, err = cli("ledger", "verify", *second.store_options())
    assert code == 0, err
    assert "ledger intact" in out and f"{len(rounds)} round records signed" in out

    coordinator_key = NodeKey.load_or_create(data_dir / "coordinator.key")
    code, _, err = cli("ledger", "verify", *forged_copy(second, tmp_path, "forged", overpay, sign_with=coordinator_key))
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
