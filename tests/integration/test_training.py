"""Real processes: a coordinator and PyTorch trainers over aiortc data channels, in a loopback-only namespace. What
a coordinator keeps across a kill is checked once on SQLite and once on PostgreSQL (the `store_url` fixture)."""

from __future__ import annotations

TRAIN_ARGS = ("--inner-steps", "6", "--batch", "8", "--deadline-seconds", "90")


def test_two_trainers_train_tiny_together_over_webrtc(processes, loopback_namespace):
    coordinator = processes.coordinator(*TRAIN_ARGS, "--rounds", "3")
    initial = coordinator.wait_ready()
    assert initial["round"] == 0 and initial["job"]["model"] == "tiny"
    trainers = [processes.trainer(coordinator.url), processes.trainer(coordinator.url)]

    final = coordinator.wait_for(lambda s: s["state"] == "finished", 300, "3 committed rounds")
    history = final["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5, history
    assert all(h["accepted"] >= 1 and h["rejected"] == 0 for h in history[1:]), history
    assert len(final["nodes"]) == 2
    assert all(n["updates_accepted"] >= 2 for n in final["nodes"]), final["nodes"]
    assert [(n["kind"], n["last_path"]) for n in final["nodes"]] == [("trainer", "webrtc")] * 2
    # the job's end sends every trainer a goodbye: they leave cleanly
    assert [t.wait(60) for t in trainers] == [0, 0]


def test_trainer_leaves_after_max_rounds(processes, loopback_namespace):
    coordinator = processes.coordinator(*TRAIN_ARGS)
    coordinator.wait_ready()
    trainer = processes.trainer(coordinator.url, "--max-rounds", "2")
    assert trainer.wait(240) == 0, trainer.output()
    status = coordinator.wait_for(lambda s: s["round"] >= 2, 60, "two rounds")
    (node,) = status["nodes"]
    assert node["updates_accepted"] == 2
    assert node["state"] == "offline"


def test_killed_coordinator_resumes_at_the_next_round(processes, loopback_namespace, tmp_path, store_url):
    data_dir = tmp_path / "data"
    first = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url)
    first.wait_ready()
    trainers = [processes.trainer(first.url), processes.trainer(first.url)]
    first.wait_for(lambda s: s["round"] >= 1, 240, "a committed round")
    first.kill()  # SIGKILL: no shutdown code runs

    with first.read_store() as books:
        last = books.last_round()
    committed, committed_hash = last.round, last.model_hash
    assert committed >= 1

    second = processes.coordinator(*TRAIN_ARGS, data_dir=data_dir, store=store_url, port=first.port)
    resumed = second.wait_ready()
    assert resumed["round"] == committed
    assert resumed["model_hash"] == committed_hash  # the checkpoint of the last committed round is loaded

    status = second.wait_for(lambda s: s["round"] >= committed + 2, 300, "two more rounds after the restart")
    rounds = [h["round"] for h in status["history"]]
    assert rounds == list(range(len(rounds))), rounds  # no lost and no repeated round
    after = [h for h in status["history"] if h["round"] > committed]
    assert all(h["accepted"] >= 1 for h in after)
    # the same two trainers (same keys) reconnected and kept contributing
    assert len(status["nodes"]) == 2
    with second.read_store() as books:
        contributors = {u.node_id for u in books.updates() if u.round >= committed and u.accepted}
    assert len(contributors) == 2
    assert all(t.proc.poll() is None for t in trainers)


def test_a_trainer_without_webrtc_trains_over_the_websocket_fallback(processes, loopback_namespace):
    coordinator = processes.coordinator(*TRAIN_ARGS)
    coordinator.wait_ready()
    processes.trainer(coordinator.url, "--transport", "websocket")
    status = coordinator.wait_for(lambda s: s["round"] >= 2 and [n["path"] for n in s["nodes"]] == ["websocket"],
                                  180, "two rounds trained over the fallback path")
    assert status["nodes"][0]["kind"] == "trainer" and status["nodes"][0]["updates_accepted"] >= 2
    assert all(h["accepted"] == 1 for h in status["history"][1:3])
    assert status["history"][1]["bytes"] == 4 * status["job"]["params"]  # one fp32 pseudo-gradient
