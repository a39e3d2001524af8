"""Overlapped rounds end to end (issue 12): a real Chromium page (WebGPU on SwiftShader, Pyodide) and a PyTorch
trainer train a `--overlap` job with a real coordinator process, over WebRTC.

With overlap, the job's first round runs alone; then round r+1 opens on the model committed after r-1 rounds while
round r still collects, and a node takes it up as soon as it has sent round r's update. Runs in a loopback-only
network namespace (`./dev test`).
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request

import pytest

from e2e.test_browser_node import JOB, accepted_updates, open_page, wait_for_state
from shared.manifest import Manifest

ROUNDS = 3
BLOBS, SHARDS = "**/api/blobs/*", "**/api/shards/*"
# what the trainer logs of each model it comes to hold (server/trainer.py TorchPort.report): the round, counted
# from 1, how the model came, and the hash that the bytes it holds were checked against
TRAINER_MODEL = re.compile(r"round (\d+): model (fetched as|updated by a delta of|fetched over the link) .*?; "
                           r"model ([0-9a-f]{64})")
TRAINER_SOURCE = {"fetched as": "blobs", "updated by a delta of": "delta", "fetched over the link": "link"}


def trainer_models(log: str) -> list[tuple[int, str, str]]:
    """(round from 0, source, hash) of each model the trainer came to hold, in order."""
    return [(int(r) - 1, TRAINER_SOURCE[how], h) for r, how, h in TRAINER_MODEL.findall(log)]


def snapshot_blobs(url: str, manifest: str) -> set[str]:
    """The names of a published model's snapshot blobs: its signed manifest and the chunks it lists."""
    with urllib.request.urlopen(f"{url}/api/blobs/{manifest}", timeout=30) as r:
        return {manifest, *Manifest.from_bytes(r.read(), manifest).chunks}


@pytest.mark.timeout(240)
def test_overlapped_rounds_a_browser_and_a_trainer_train_on_delayed_models(processes, chromium, loopback_namespace):
    # the star (--peers 0): the page fetches every blob from the coordinator over HTTP, where the test can hold it
    coordinator = processes.coordinator(*JOB, "--overlap", "--rounds", str(ROUNDS), "--peers", "0")
    initial = coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    # the page's shard is held until the trainer has joined round 1, so that both train it. The page may fetch
    # the initial model; the blobs of any later one are held, so round 2 cannot close before the test lets the
    # page have its model: meanwhile the trainer trains round 2 and goes on to round 3. (Playwright runs a route's
    # handler only while the test waits in a call of its own.)
    first = snapshot_blobs(coordinator.url, initial["manifest"])
    held, shard = [], []
    page.route(BLOBS, lambda route: route.continue_() if route.request.url.rsplit("/", 1)[1] in first
               else held.append(route))
    page.route(SHARDS, lambda route: shard.append(route))
    page.click("#contribute")
    coordinator.wait_for(lambda s: s["open_round"] is not None and any(
        n["kind"] == "browser" and n["path"] == "webrtc" for n in s["nodes"]), 120,
                         "round 1 open for the page, on a WebRTC data channel")
    trainer = processes.trainer(coordinator.url, progress=True)
    coordinator.wait_for(lambda s: s["open_round"]["assigned"] == 2, 120, "the trainer in round 1")
    while not shard:
        page.wait_for_timeout(100)
    for route in shard:
        route.continue_()
    page.unroute(SHARDS)
    wait_for_state(page, "s.models.length >= 1", 150)

    # the overlap: the trainer's update for round 3 arrived while round 2 still waits for the page's update
    ahead = coordinator.wait_for(lambda s: s["intake"]["deferred"] == 1, 120,
                                 "the trainer's round-3 update while round 2 collects")
    assert ahead["round"] == 1 and ahead["settling"] is None  # round 1 (both nodes) committed, nothing after
    assert ahead["open_round"]["round"] == 1 and ahead["open_round"]["assigned"] == 2, ahead["open_round"]
    assert ahead["open_round"]["reported"] == 1  # the trainer's round-2 update; the page's waits on its model
    assert ahead["next_round"] == {"round": 2, "assigned": 2}
    assert ahead["history"][1]["accepted"] == 2  # the first round ran alone, with both nodes
    while not held:  # Playwright hands a held request over while the test waits in it
        page.wait_for_timeout(100)
    for route in held:
        route.continue_()
    page.unroute(BLOBS)

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

    # what each node held: round 0 the initial model; rounds 1 and 2 the model committed after round 0 (round 2
    # opened while round 1 collected); the later one came as a delta, applied by the node to the signed hash
    def trained_on(r: int) -> str:
        return history[max(min(r, 1), r - 1)]["model_hash"]

    state = wait_for_state(page, "s.phase === 'finished'", 60)
    assert state["nodeId"] == nodes["browser"]["id"]
    assert (state["updatesAccepted"], state["updatesRejected"]) == (ROUNDS, 0)  # every verdict booked
    assert trainer.wait(60) == 0  # the job's end: the trainer leaves by itself
    log = trainer.output()
    assert sorted(re.findall(r"round (\d+): update accepted", log)) == [str(r + 1) for r in range(ROUNDS)], log
    fetched = {"browser": [(m["round"] - 1, m["source"], m["hash"]) for m in state["models"]],
               "trainer": trainer_models(log)}
    for kind, models in fetched.items():
        assert models == [(0, "blobs", trained_on(0)), (1, "delta", trained_on(1))], (kind, models, history)
        # round 2 fetched nothing: it trains on the model round 1 trained on, which the node held
        assert trained_on(2) == trained_on(1) != trained_on(0)
    # and each update was computed on that model, as each node says when it sends it
    uploads = {"browser": [(u["round"], u["modelHash"]) for u in state["trainedOn"]],
               "trainer": [(int(r) - 1, h) for r, h in re.findall(r"round (\d+): uploaded .*?trained on model "
                                                                    r"([0-9a-f]{64})", log)]}
    for kind, sent in uploads.items():
        assert sent == [(r, trained_on(r)) for r in range(ROUNDS)], (kind, sent, history)
