"""The store and checkpoints: a round commits whole or not at all, and checkpoints are verified when read. Every
behaviour of the store holds on SQLite and on PostgreSQL alike (the `location` fixture runs each test on both)."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest

from server.coordinator.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from server.coordinator.governor import Governor
from server.coordinator.store import OutdatedSchema, RoundRecord, Store, StoreUnavailable, UpdateRecord, open_store
from server.coordinator.store_postgres import TYPES as POSTGRES_TYPES
from server.coordinator.store_sqlite import TYPES as SQLITE_TYPES
from server.keys import NodeKey


def record(round_: int) -> RoundRecord:
    return RoundRecord(round_, "a" * 64, f"round-{round_:06d}.ckpt", "b" * 64, 2.5, 1, 0, 100, 4000, 1.0, 2.0, 1.5,
                       "c" * 64)


def update(round_: int, node: str, accepted: bool = True) -> UpdateRecord:
    return UpdateRecord(round_, node, accepted, "" if accepted else "finite: NaN", 100, 5, 3.0, 2.0, 4000, 1.0, 1.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where a test's store lives: a SQLite file, or a fresh PostgreSQL database (tests/postgres.py)."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres_url")


def run_script(location: str, script: str) -> None:
    """SQL run behind the store's back (an older coordinator's tables), in SQLite's or PostgreSQL's words."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location, autocommit=True) as db:
            db.execute(script.format(**POSTGRES_TYPES))
    else:
        with sqlite3.connect(location) as db:
            db.executescript(script.format(**SQLITE_TYPES))


def test_a_committed_round_is_read_back_with_its_updates_and_node_counters(location):
    store = open_store(location)
    store.touch_node("n1", "trainer")
    store.touch_node("n2", "browser")
    store.commit_round(record(1), [update(0, "n1"), update(0, "n2", accepted=False)])
    assert store.last_round() == record(1)
    assert [u.node_id for u in store.updates(0)] == ["n1", "n2"]
    nodes = {n["id"]: n for n in store.nodes()}
    assert (nodes["n1"]["updates_accepted"], nodes["n1"]["tokens"]) == (1, 100)
    assert (nodes["n2"]["updates_rejected"], nodes["n2"]["tokens"]) == (1, 0)


def test_a_failed_commit_leaves_nothing_behind(location):
    store = open_store(location)
    store.touch_node("n1", "trainer")
    store.commit_round(record(1), [])
    with pytest.raises(store.errors, match="rounds[._]"):  # round 1 again: the primary key refuses it
        store.commit_round(record(1), [update(1, "n1")])
    assert store.updates() == []
    assert store.nodes()[0]["updates_accepted"] == 0
    assert [r.round for r in store.rounds()] == [1]


def test_state_survives_reopening(location):
    open_store(location).commit_round(record(1), [])
    reopened = open_store(location)
    reopened.set_meta("job", {"model": "tiny"})
    reopened.set_meta("job", {"model": "small"})  # an upsert: the key's one row changes
    assert reopened.last_round().round == 1
    assert open_store(location).get_meta("job") == {"model": "small"}


def test_times_losses_and_large_counters_read_back_exactly(location):
    # 8-byte floats and integers in both databases: a Unix time to the microsecond, a loss's last digits, and
    # byte and token counts past 2**31
    store = open_store(location)
    store.touch_node("n1", "trainer")
    exact = dataclasses.replace(record(1), val_loss=2.718281828459045, tokens=5_000_000_123,
                                opened_at=1_767_225_600.123456, closed_at=1_767_225_661.654321, bytes_sent=2**40 + 7)
    big = dataclasses.replace(update(0, "n1"), tokens=3_000_000_000, received_at=1_767_225_630.000001)
    store.commit_round(exact, [big])
    assert open_store(location, read_only=True).last_round() == exact
    assert store.updates() == [dataclasses.replace(big, committed_round=1)]
    assert store.nodes()[0]["tokens"] == 3_000_000_000


def test_checkpoint_round_trips_with_momentum(tmp_path):
    params = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    momentum = params * 0.5
    path, sha = write_checkpoint(tmp_path, Checkpoint(3, params, momentum))
    back = read_checkpoint(path, sha)
    assert back.round == 3
    np.testing.assert_array_equal(back.params, params)
    np.testing.assert_array_equal(back.momentum, momentum)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_tampered_or_truncated_checkpoint_is_refused(tmp_path):
    path, sha = write_checkpoint(tmp_path, Checkpoint(1, np.ones(10, np.float32), None))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash"):
        read_checkpoint(path, sha)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(CheckpointError, match="bytes"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "missing.ckpt")


# ---- what an auditor needs: signed rounds, and each update's reward inputs ----

OLD_SCHEMA = """
CREATE TABLE rounds (round {int} PRIMARY KEY, model_hash {text} NOT NULL, checkpoint {text} NOT NULL,
    checkpoint_sha256 {text} NOT NULL, val_loss {real}, accepted {int} NOT NULL, rejected {int} NOT NULL,
    tokens {int} NOT NULL, bytes_received {int} NOT NULL, opened_at {real} NOT NULL, closed_at {real} NOT NULL,
    deadline {real} NOT NULL, ledger_head {text} NOT NULL);
CREATE TABLE updates (id {serial}, round {int} NOT NULL, node_id {text} NOT NULL,
    accepted {int} NOT NULL, reason {text} NOT NULL, tokens {int} NOT NULL, inner_steps {int} NOT NULL,
    loss_first {real}, loss_last {real}, bytes {int} NOT NULL, weight {real} NOT NULL, received_at {real} NOT NULL);
INSERT INTO rounds VALUES (0, 'h0', 'round-000000.ckpt', 's0', 3.0, 0, 0, 0, 0, 1.0, 1.0, 1.0, '');
INSERT INTO updates (round, node_id, accepted, reason, tokens, inner_steps, loss_first, loss_last, bytes, weight,
    received_at) VALUES (0, 'n1', 1, '', 100, 5, 3.0, 2.0, 4000, 1.0, 1.5);
"""


def test_a_round_record_keeps_the_coordinators_signature(location):
    store = open_store(location)
    signed = dataclasses.replace(record(1), signature="ab" * 64)
    store.commit_round(signed, [])
    assert store.last_round() == signed
    assert record(1).signature == ""  # built positionally without one, as before the signature existed


def test_an_update_record_keeps_its_reward_inputs_and_the_round_it_was_committed_with(location):
    store = open_store(location)
    late = dataclasses.replace(update(0, "n1"), quality_ppm=750_000, aggregated=True)
    discarded = dataclasses.replace(update(1, "n2"), quality_ppm=10, aggregated=False)
    store.commit_round(record(2), [late, discarded, update(1, "n3", accepted=False)])
    assert store.updates() == [dataclasses.replace(late, committed_round=2),
                               dataclasses.replace(discarded, committed_round=2),
                               dataclasses.replace(update(1, "n3", accepted=False), committed_round=2)]


def test_an_older_database_gains_the_new_columns_and_keeps_its_rows(location):
    path = location
    run_script(location, OLD_SCHEMA)
    audit = Store(path, read_only=True)
    assert audit.rounds()[0].signature == ""  # the rounds still read, unsigned
    with pytest.raises(OutdatedSchema, match="updates lacks quality_ppm, aggregated, committed_round"):
        audit.updates()
    audit.close()

    store = Store(path)
    (old,) = store.updates()
    assert (old.node_id, old.quality_ppm, old.aggregated, old.committed_round) == ("n1", 0, False, None)
    store.commit_round(dataclasses.replace(record(1), signature="cd" * 64),
                       [dataclasses.replace(update(0, "n2"), quality_ppm=5, aggregated=True)])
    assert [(r.round, r.signature) for r in store.rounds()] == [(0, ""), (1, "cd" * 64)]
    assert [(u.node_id, u.quality_ppm, u.aggregated, u.committed_round) for u in store.updates()] == [
        ("n1", 0, False, None), ("n2", 5, True, 1)]
    assert Store(path, read_only=True).updates()[1].committed_round == 1


def test_a_read_only_store_creates_and_writes_nothing(tmp_path, postgres_url):
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "missing" / "state.db", read_only=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(FileNotFoundError, match="no coordinator state in postgresql://"):
        open_store(postgres_url, read_only=True)  # an empty database: it stays empty
    assert open_store(postgres_url).rounds() == []  # (the coordinator creates the tables)
    for location in (str(tmp_path / "state.db"), postgres_url):
        open_store(location).commit_round(record(1), [update(0, "n1")])
        audit = open_store(location, read_only=True)
        assert [r.round for r in audit.rounds()] == [1] and len(audit.updates()) == 1
        with pytest.raises(audit.errors, match="read-?only"):
            audit.set_meta("job", {"model": "tiny"})


def test_a_postgresql_server_that_cannot_be_reached_is_a_clear_error(postgres_server):
    closed = postgres_server.url("no_such_database")
    with pytest.raises(StoreUnavailable, match="cannot open the PostgreSQL store postgresql://.*no_such_database"):
        open_store(closed)
    with pytest.raises(StoreUnavailable, match="postgresql://auditor:\\*\\*\\*@127.0.0.1"):  # never the password
        open_store(f"postgresql://auditor:s3cret@127.0.0.1:{postgres_server.port}/postgres")


def test_a_snapshot_reads_one_committed_state_while_rounds_commit(location):
    coordinator = open_store(location)
    coordinator.commit_round(record(1), [])
    audit = open_store(location, read_only=True)
    with audit.snapshot():
        assert [r.round for r in audit.rounds()] == [1]
        coordinator.commit_round(record(2), [], ledger=[], balances={"mint": -5, "n1": 5})
        with audit.snapshot():  # the same snapshot
            assert [r.round for r in audit.rounds()] == [1]
        assert audit.balances() == {}
    assert [r.round for r in audit.rounds()] == [1, 2] and audit.balances() == {"mint": -5, "n1": 5}


OLD_NODES = """
CREATE TABLE nodes (id {text} PRIMARY KEY, kind {text} NOT NULL, agent {text} NOT NULL DEFAULT '',
    first_seen {real} NOT NULL, last_seen {real} NOT NULL, updates_accepted {int} NOT NULL DEFAULT 0,
    updates_rejected {int} NOT NULL DEFAULT 0, tokens {int} NOT NULL DEFAULT 0, last_path {text});
INSERT INTO nodes (id, kind, first_seen, last_seen) VALUES ('n1', 'trainer', 1.0, 2.0);
"""


def test_an_older_nodes_table_gains_name_and_team_and_a_hello_sets_them(location):
    path = location
    run_script(location, OLD_NODES)
    audit = Store(path, read_only=True)
    assert [(n["id"], n["name"], n["team"]) for n in audit.nodes()] == [("n1", "", "")]  # read nameless
    assert audit.team_contributed_rounds() == {}
    audit.close()

    store = Store(path)
    assert [(n["id"], n["name"], n["team"]) for n in store.nodes()] == [("n1", "", "")]
    store.touch_node("n1", "trainer", "torch", name="Ada", team="Lab 7")
    assert [(n["name"], n["team"]) for n in store.nodes()] == [("Ada", "Lab 7")]
    store.touch_node("n1", "trainer", "torch")  # a later hello without them clears them: only the signed hello counts
    assert [(n["name"], n["team"]) for n in store.nodes()] == [("", "")]


def test_contributed_rounds_count_rounds_with_an_accepted_update_per_node_and_team(location):
    store = open_store(location)
    store.touch_node("n1", "trainer", team="Lab")
    store.touch_node("n2", "trainer", team="Lab")
    store.touch_node("n3", "browser")
    store.commit_round(record(1), [update(0, "n1"), update(0, "n2"), update(0, "n3", accepted=False)])
    store.commit_round(record(2), [update(1, "n2"), update(1, "n3")])
    assert store.contributed_rounds() == {"n1": 1, "n2": 2, "n3": 1}
    assert store.team_contributed_rounds() == {"Lab": 2}


def test_balances_and_proposals_read_back_in_byte_order(location):
    # PostgreSQL's text compares as the database's locale says unless told otherwise; the store's columns compare
    # byte by byte, as SQLite's do, so both list accounts and proposals in one order
    store = open_store(location)
    accounts = {"stake:b": 1, "stake_a": 2, "Stake:c": 3, "mint": -6, "\u00e9t\u00e9": 0}
    store.commit_round(record(1), [], balances=accounts)
    assert list(store.balances()) == sorted(accounts, key=lambda a: a.encode())


def test_a_vote_and_a_boundary_decision_survive_a_restart(location):
    from tests.test_governance import admitted, signed_proposal, signed_vote  # (it imports this module)

    governor = Governor(open_store(location), NodeKey(), {})
    alice = admitted(governor, 5)
    proposal_id = governor.propose(signed_proposal(alice, 0), current_round=0)["proposal"]["id"]
    governor.vote(signed_vote(alice, proposal_id, 0), current_round=0)
    assert [v["voter"] for v in Governor(open_store(location), NodeKey(), {}).store.proposals()[0]["votes"]] == [
        alice.node_id]  # the vote is durable before any round commits
    governor.boundary(1)
    books = governor.snapshot()
    governor.store.commit_round(record(1), [], books["ledger"], governor.ledger.balances(), books["meta"],
                                books["proposals"])
    restarted = Governor(open_store(location), NodeKey(), {})
    state = restarted.governance.proposals[proposal_id]
    assert (state.status, state.decided_round, set(state.votes)) == ("applied", 1, {alice.node_id})
    assert restarted.params["lr"] == 0.001
