"""The store and checkpoints: a round commits whole or not at all, and checkpoints are verified when read."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest

from server.coordinator.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from server.coordinator.store import OutdatedSchema, RoundRecord, Store, UpdateRecord


def record(round_: int) -> RoundRecord:
    return RoundRecord(round_, "a" * 64, f"round-{round_:06d}.ckpt", "b" * 64, 2.5, 1, 0, 100, 4000, 1.0, 2.0, 1.5,
                       "c" * 64)


def update(round_: int, node: str, accepted: bool = True) -> UpdateRecord:
    return UpdateRecord(round_, node, accepted, "" if accepted else "finite: NaN", 100, 5, 3.0, 2.0, 4000, 1.0, 1.5)


def test_a_committed_round_is_read_back_with_its_updates_and_node_counters(tmp_path):
    store = Store(tmp_path / "state.db")
    store.touch_node("n1", "trainer")
    store.touch_node("n2", "browser")
    store.commit_round(record(1), [update(0, "n1"), update(0, "n2", accepted=False)])
    assert store.last_round() == record(1)
    assert [u.node_id for u in store.updates(0)] == ["n1", "n2"]
    nodes = {n["id"]: n for n in store.nodes()}
    assert (nodes["n1"]["updates_accepted"], nodes["n1"]["tokens"]) == (1, 100)
    assert (nodes["n2"]["updates_rejected"], nodes["n2"]["tokens"]) == (1, 0)


def test_a_failed_commit_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path / "state.db")
    store.touch_node("n1", "trainer")
    store.commit_round(record(1), [])
    with pytest.raises(sqlite3.IntegrityError, match="rounds.round"):  # round 1 again: the primary key refuses it
        store.commit_round(record(1), [update(1, "n1")])
    assert store.updates() == []
    assert store.nodes()[0]["updates_accepted"] == 0
    assert [r.round for r in store.rounds()] == [1]


def test_state_survives_reopening(tmp_path):
    Store(tmp_path / "state.db").commit_round(record(1), [])
    reopened = Store(tmp_path / "state.db")
    reopened.set_meta("job", {"model": "tiny"})
    assert reopened.last_round().round == 1
    assert Store(tmp_path / "state.db").get_meta("job") == {"model": "tiny"}


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
CREATE TABLE rounds (round INTEGER PRIMARY KEY, model_hash TEXT NOT NULL, checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL, val_loss REAL, accepted INTEGER NOT NULL, rejected INTEGER NOT NULL,
    tokens INTEGER NOT NULL, bytes_received INTEGER NOT NULL, opened_at REAL NOT NULL, closed_at REAL NOT NULL,
    deadline REAL NOT NULL, ledger_head TEXT NOT NULL);
CREATE TABLE updates (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, node_id TEXT NOT NULL,
    accepted INTEGER NOT NULL, reason TEXT NOT NULL, tokens INTEGER NOT NULL, inner_steps INTEGER NOT NULL,
    loss_first REAL, loss_last REAL, bytes INTEGER NOT NULL, weight REAL NOT NULL, received_at REAL NOT NULL);
INSERT INTO rounds VALUES (0, 'h0', 'round-000000.ckpt', 's0', 3.0, 0, 0, 0, 0, 1.0, 1.0, 1.0, '');
INSERT INTO updates (round, node_id, accepted, reason, tokens, inner_steps, loss_first, loss_last, bytes, weight,
    received_at) VALUES (0, 'n1', 1, '', 100, 5, 3.0, 2.0, 4000, 1.0, 1.5);
"""


def test_a_round_record_keeps_the_coordinators_signature(tmp_path):
    store = Store(tmp_path / "state.db")
    signed = dataclasses.replace(record(1), signature="ab" * 64)
    store.commit_round(signed, [])
    assert store.last_round() == signed
    assert record(1).signature == ""  # built positionally without one, as before the signature existed


def test_an_update_record_keeps_its_reward_inputs_and_the_round_it_was_committed_with(tmp_path):
    store = Store(tmp_path / "state.db")
    late = dataclasses.replace(update(0, "n1"), quality_ppm=750_000, aggregated=True)
    discarded = dataclasses.replace(update(1, "n2"), quality_ppm=10, aggregated=False)
    store.commit_round(record(2), [late, discarded, update(1, "n3", accepted=False)])
    assert store.updates() == [dataclasses.replace(late, committed_round=2),
                               dataclasses.replace(discarded, committed_round=2),
                               dataclasses.replace(update(1, "n3", accepted=False), committed_round=2)]


def test_an_older_database_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
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


def test_a_read_only_store_creates_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "missing" / "state.db", read_only=True)
    assert not (tmp_path / "missing").exists()
    Store(tmp_path / "state.db").commit_round(record(1), [update(0, "n1")])
    audit = Store(tmp_path / "state.db", read_only=True)
    assert [r.round for r in audit.rounds()] == [1] and len(audit.updates()) == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        audit.set_meta("job", {"model": "tiny"})


OLD_NODES = """
CREATE TABLE nodes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, agent TEXT NOT NULL DEFAULT '', first_seen REAL NOT NULL,
    last_seen REAL NOT NULL, updates_accepted INTEGER NOT NULL DEFAULT 0, updates_rejected INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0, last_path TEXT);
INSERT INTO nodes (id, kind, first_seen, last_seen) VALUES ('n1', 'trainer', 1.0, 2.0);
"""


def test_an_older_nodes_table_gains_name_and_team_and_a_hello_sets_them(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_NODES)
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


def test_contributed_rounds_count_rounds_with_an_accepted_update_per_node_and_team(tmp_path):
    store = Store(tmp_path / "state.db")
    store.touch_node("n1", "trainer", team="Lab")
    store.touch_node("n2", "trainer", team="Lab")
    store.touch_node("n3", "browser")
    store.commit_round(record(1), [update(0, "n1"), update(0, "n2"), update(0, "n3", accepted=False)])
    store.commit_round(record(2), [update(1, "n2"), update(1, "n3")])
    assert store.contributed_rounds() == {"n1": 1, "n2": 2, "n3": 1}
    assert store.team_contributed_rounds() == {"Lab": 2}
