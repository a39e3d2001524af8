"""The store and checkpoints: a round commits whole or not at all, and checkpoints are verified when read."""

from __future__ import annotations

import numpy as np
import pytest

from server.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from server.store import RoundRecord, Store, UpdateRecord


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
    with pytest.raises(Exception):  # round 1 again: the primary key refuses it
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
