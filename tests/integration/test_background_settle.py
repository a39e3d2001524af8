"""The commit off the critical path, with real processes: the next round trains while the last one settles, and a
coordinator killed (SIGKILL) while a round settles leaves a store that verifies and resumes at its last commit, on
SQLite and on PostgreSQL (the `store_url` fixture). A settle that fails writes its checkpoint, a file, before the
store is touched: that test runs on SQLite only, as does the kill with overlapped rounds."""

from __future__ import annotations

import subprocess
import sys

from server.coordinator.coordinator import SETTLE_DELAY_ENV
from tests.conftest import ROOT, Coordinator

TRAIN_ARGS = ("--inner-steps", "4", "--batch", "8", "--deadline-seconds", "90")
# every settle waits this long first (fault injection): wide enough that the test's kill lands while round 1 settles,
# on a machine of any speed
SETTLE_DELAY_S = 600


def ledger_verify(coordinator: Coordinator) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "ledger", "verify", *coordinator.store_options()],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_next_round_trains_while_a_round_settles_and_a_kill_then_resumes_at_the_last_commit(
        processes, loopback_namespace, tmp_path, store_url):
    data_dir = tmp_path / "data"
    first = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url,
                                  env={SETTLE_DELAY_ENV: str(SETTLE_DELAY_S)})
    first.wait_ready()
    processes.trainer(first.url)
    # round 1 closed and settles; round 2 is open and the trainer's update for it is already decided
    during = first.wait_for(lambda s: s["settling"] == 1 and (s["open_round"] or {}).get("reported", 0) >= 1, 300,
                            "an update of round 2 decided while round 1 settles")
    assert during["round"] == 0 and [h["round"] for h in during["history"]] == [0]  # nothing of round 1 committed
    assert during["open_round"]["round"] == 1
    assert during["model_hash"] != during["history"][0]["model_hash"]  # round 2 trains on round 1's model
    first.kill()  # SIGKILL while round 1 settles: no shutdown code runs

    with first.read_store() as books:
        (committed,) = books.rounds()
        assert committed.round == 0
        assert books.updates() == []  # no decision of round 1 or 2 kept
    committed_hash = committed.model_hash
    verified = ledger_verify(first)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    second = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url, port=first.port)
    resumed = second.wait_ready()
    assert (resumed["round"], resumed["model_hash"]) == (0, committed_hash)  # round 0's checkpoint, loaded
    status = second.wait_for(lambda s: s["round"] >= 2, 300, "two rounds after the restart")
    assert [h["round"] for h in status["history"]][:3] == [0, 1, 2]  # none lost, none repeated
    assert all(h["accepted"] == 1 for h in status["history"][1:3])
    second.stop()
    verified = ledger_verify(second)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_with_overlapped_rounds_a_kill_while_a_round_settles_resumes_at_the_last_commit(processes, loopback_namespace,
                                                                                         tmp_path):
    data_dir = tmp_path / "data"
    first = processes.coordinator(*TRAIN_ARGS, "--overlap", data_dir=data_dir,
                                  env={SETTLE_DELAY_ENV: str(SETTLE_DELAY_S)})
    first.wait_ready()
    processes.trainer(first.url)
    # round 1 (the job's first, which runs alone) settles; round 2 collects on its model with the trainer's update
    # decided, and round 3 is open on the same model
    during = first.wait_for(lambda s: s["settling"] == 1 and (s["open_round"] or {}).get("reported", 0) >= 1, 300,
                            "an update of round 2 decided while round 1 settles")
    assert (during["open_round"]["round"], during["next_round"]["round"]) == (1, 2)
    assert during["round"] == 0 and during["model_hash"] != during["history"][0]["model_hash"]
    first.kill()

    with first.read_store() as books:
        (committed,) = books.rounds()
        assert committed.round == 0 and books.updates() == []
    verified = ledger_verify(first)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    second = processes.coordinator(*TRAIN_ARGS, "--overlap", data_dir=data_dir, port=first.port)
    resumed = second.wait_ready()
    assert (resumed["round"], resumed["model_hash"]) == (0, committed.model_hash)
    status = second.wait_for(lambda s: s["round"] >= 3, 300, "three rounds after the restart")
    assert [h["round"] for h in status["history"]][:4] == [0, 1, 2, 3]  # none lost, none repeated
    assert all(h["accepted"] == 1 for h in status["history"][1:4])
    second.stop()
    verified = ledger_verify(second)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_settle_that_cannot_commit_takes_the_model_back_and_the_job_carries_on(processes, loopback_namespace,
                                                                                tmp_path):
    data_dir = tmp_path / "data"
    coordinator = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, env={SETTLE_DELAY_ENV: "15"})
    coordinator.wait_ready()
    processes.trainer(coordinator.url)
    coordinator.wait_for(lambda s: s["settling"] == 1, 300, "round 1 settling")
    # the checkpoint cannot be written (a file where its directory was; root ignores permissions, not this)
    checkpoints = data_dir / "checkpoints"
    checkpoints.rename(data_dir / "checkpoints.kept")
    checkpoints.write_text("not a directory")
    coordinator.wait_for(lambda s: "round 1 could not be committed" in coordinator.output(), 120, "the failed settle")
    checkpoints.unlink()
    (data_dir / "checkpoints.kept").rename(checkpoints)

    status = coordinator.wait_for(lambda s: s["round"] >= 2, 300, "two committed rounds after the failure")
    assert [h["round"] for h in status["history"]][:3] == [0, 1, 2]
    assert all(h["accepted"] >= 1 for h in status["history"][1:3])
    assert status["intake"]["errors"] >= 1
    assert "round 2 could not be committed" not in coordinator.output()
    coordinator.stop()
    verified = ledger_verify(coordinator)
    assert verified.returncode == 0, verified.stdout + verified.stderr
