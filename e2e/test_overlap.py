"""Overlapped rounds end to end (issue 12): a real Chromium page (WebGPU on SwiftShader, Pyodide) and a PyTorch
trainer train a `--overlap` job with a real coordinator process, over WebRTC.

With overlap, round r+1 opens on the model committed after r-1 rounds while round r still collects, and a node
takes it up as soon as it has sent round r's update. Runs in a loopback-only network namespace (`./dev test`).
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from e2e.test_browser_node import JOB, accepted_updates, open_page, wait_for_state

ROUNDS = 3
SHARDS = "**/api/shards/*"
# what the trainer logs of each model it comes to hold (server/trainer.py TorchPort.report): the round, counted
# from 1, how the model came, and the hash that the bytes it holds were checked against
TRAINER_MODEL = re.compile(r"round (\d+): model (fetched as|updated by a delta of|fetched over the link) .*?; "
                           r"model ([0-9a-f]{64})")
TRAINER_SOURCE = {"fetched as": "blobs", "updated by a delta of": "delta", "fetched over the link": "link"}


def trainer_models(log: str) -> list[tuple[int, str, str]]:
    """(round from 0, source, hash) of each model the trainer came to hold, in order."""
    return [(int(r) - 1, TRAINER_SOURCE[how], h) for r, how, h in TRAINER_MODEL.findall(log)]


@pytest.mark.timeout(240)
def test_overlapped_rounds_a_browser_and_a_trainer_train_on_delayed_models(processes, chromium, loopback_namespace):
    coordinator = processes.coordinator(*JOB, "--overlap", "--rounds", str(ROUNDS))
    coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    # the page's shard is held back, so round 1 cannot close before the test lets the page train it: meanwhile the
    # trainer joins round 1 (every round then waits for both nodes), trains it, and goes on to train round 2
    held, holding = [], [True]
    page.route(SHARDS, lambda route: held.append(route) if holding else route.continue_())
    page.click("#contribute")
    coordinator.wait_for(lambda s: s["open_round"] is not None and any(
        n["kind"] == "browser" and n["path"] == "webrtc" for n in s["nodes"]), 120,
                         "round 1 open for the page, on a WebRTC data channel")
    trainer = processes.trainer(coordinator.url, progress=True)

    # the overlap: the trainer's update for round 2 arrived while round 1 still waits for the page's update
    ahead = coordinator.wait_for(lambda s: s["intake"]["deferred"] == 1, 120,
                                 "the trainer's round-2 update while round 1 collects")
    assert ahead["round"] == 0 and ahead["settling"] is None  # nothing committed yet
    assert ahead["open_round"]["round"] == 0 and ahead["open_round"]["assigned"] == 2, ahead["open_round"]
    assert ahead["open_round"]["reported"] == 1  # the trainer's round-1 update; the page's waits on its shard
    assert ahead["next_round"] == {"round": 1, "assigned": 2}
    while not held:  # Playwright hands the held request over while the test waits in it
        page.wait_for_timeout(100)
    holding.clear()
    for route in held:
        route.continue_()
    page.unroute(SHARDS)

    final = coordinator.wait_for(lambda s: s["state"] == "finished", 150, f"{ROUNDS} committed rounds")
    history = final["history"]
    assert [h["round"] for h in history] == list(range(ROUNDS + 1))
    assert all(h["accepted"] == 2 and h["rejected"] == 0 for h in history[1:]), history
    # the delayed outer steps still learn
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    nodes = {n["kind"]: n for n in final["nodes"]}
    assert set(nodes) == {"browser", "trainer"} and len(final["nodes"]) == 2
    assert all(n["last_path"] == "webrtc" and n["updates_accepted"] == ROUNDS for n in nodes.values()), nodes
    by_round: dict[int, set[str]] = {}
    for round_, node_id in accepted_updates(coordinator.data_dir):
        by_round.setdefault(round_, set()).add(node_id)
    assert by_round == {r: {nodes["browser"]["id"], nodes["trainer"]["id"]} for r in range(ROUNDS)}, by_round
    with sqlite3.connect(coordinator.data_dir / "state.db") as db:
        weights = db.execute("SELECT round, node_id, weight FROM updates").fetchall()
    assert all(w == 1.0 for _, _, w in weights), weights  # an update that waited for its round counts in full

    # what each node held: round 0 and round 1 train on the initial model, round r on the model committed after
    # r-1 rounds; the first came as the snapshot, the later one as a delta applied by the node to the signed hash
    def trained_on(r: int) -> str:
        return history[max(0, r - 1)]["model_hash"]

    state = wait_for_state(page, "s.phase === 'finished'", 60)
    assert state["nodeId"] == nodes["browser"]["id"]
    assert (state["updatesAccepted"], state["updatesRejected"]) == (ROUNDS, 0)  # every verdict booked
    assert trainer.wait(60) == 0  # the job's end: the trainer leaves by itself
    log = trainer.output()
    assert sorted(re.findall(r"round (\d+): update accepted", log)) == [str(r + 1) for r in range(ROUNDS)], log
    fetched = {"browser": [(m["round"] - 1, m["source"], m["hash"]) for m in state["models"]],
               "trainer": trainer_models(log)}
    for kind, models in fetched.items():
        assert models == [(0, "blobs", trained_on(0)), (2, "delta", trained_on(2))], (kind, models, history)
        # round 1 fetched nothing: it trains on the model round 0 trained on, which the node held
        assert trained_on(1) == trained_on(0)
    # and each update was computed on that model, as each node says when it sends it
    uploads = {"browser": [(u["round"], u["modelHash"]) for u in state["trainedOn"]],
               "trainer": [(int(r) - 1, h) for r, h in re.findall(r"round (\d+): uploaded .*?trained on model "
                                                                    r"([0-9a-f]{64})", log)]}
    for kind, sent in uploads.items():
        assert sent == [(r, trained_on(r)) for r in range(ROUNDS)], (kind, sent, history)
