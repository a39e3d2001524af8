"""A real Chromium page in the peer mesh (shared/swarm.py, browser/peers.js): the page and three PyTorch trainers,
advised by the coordinator as tracker, open WebRTC data channels to each other and trade the model's chunks.

Runs in a loopback-only network namespace (`./dev test` provides it).
"""

from __future__ import annotations

import re

import pytest

from e2e.test_browser_node import SCREENSHOT_DIR, STATE_JS, accepted_updates, open_page, wait_for_state

ROUNDS = 3
# fp32 deltas are three chunks of the tiny model: whichever seed slot the page draws on the ring, at least two of
# them are another node's to fetch from the coordinator, so the page gets them from its peers
JOB = ("--inner-steps", "3", "--batch", "4", "--deadline-seconds", "300", "--rounds", str(ROUNDS), "--peers", "3",
       "--verify-share", "0", "--delta-codec", "fp32")
TRAINER_STEP_S = 0.5  # every round lasts at least 3 such steps, while the page's links stay open: time to look
SHARDS = "**/api/shards/*"


@pytest.mark.timeout(240)
def test_browser_and_trainers_trade_chunks_over_peer_links(processes, chromium, loopback_namespace):
    coordinator = processes.coordinator(*JOB)
    initial = coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    # round 1 opens as soon as the page joins, and closes once every node assigned to it reported: the page's shard
    # is held back until all three trainers have joined that round, so that every node is in every round
    held, holding = [], [True]
    page.route(SHARDS, lambda route: held.append(route) if holding else route.continue_())
    page.click("#contribute")
    coordinator.wait_for(lambda s: s["open_round"] is not None, 120, "round 1 open for the page")
    for _ in range(3):
        processes.trainer(coordinator.url, min_step_seconds=TRAINER_STEP_S)
    coordinator.wait_for(lambda s: s["open_round"]["round"] == 0 and s["open_round"]["assigned"] == 4, 120,
                         "the three trainers assigned to round 1")
    while not held:  # Playwright hands the held request over while the test waits in it
        page.wait_for_timeout(100)
    holding.clear()
    for route in held:
        route.continue_()
    page.unroute(SHARDS)

    # from round 2 every node links to the three others and the links stay up until the job ends
    state = wait_for_state(page, "s.peers >= 1 && s.models.length >= 2", 120)
    page.screenshot(path=str(SCREENSHOT_DIR / "swarmgrad-mesh.png"), full_page=True)
    assert re.fullmatch(r"[1-3] open", page.inner_text("#peers"))
    assert re.fullmatch(r"\S+ [kM]?B from peers, \S+ [kM]?B from the coordinator", page.inner_text("#model-bytes"))

    final = coordinator.wait_for(lambda s: s["state"] == "finished", 120, f"{ROUNDS} committed rounds")
    history = final["history"]
    assert [h["round"] for h in history] == list(range(ROUNDS + 1))
    assert all(h["accepted"] == 4 and h["rejected"] == 0 for h in history[1:]), history
    (browser,) = [n for n in final["nodes"] if n["kind"] == "browser"]
    assert browser["id"] == state["nodeId"] and len(final["nodes"]) == 4
    by_round: dict[int, set[str]] = {}
    for round_, node_id in accepted_updates(coordinator.data_dir):
        by_round.setdefault(round_, set()).add(node_id)
    assert by_round == {r: {n["id"] for n in final["nodes"]} for r in range(ROUNDS)}, by_round
    assert browser["bytes_from_peers"] > 0, browser

    # the page's own account: round 1's model as the snapshot, then deltas, each to the coordinator's model hash
    state = wait_for_state(page, "s.phase === 'finished'", 60)
    models = state["models"]
    assert [(m["round"], m["source"]) for m in models] == [(1, "blobs")] + [(r, "delta") for r in range(2, ROUNDS + 1)]
    assert [m["hash"] for m in models] == [h["model_hash"] for h in history[:ROUNDS]]
    assert state["bytesFromPeers"] > 0 and state["bytesFromCoordinator"] > 0
    assert state["updatesAccepted"] == ROUNDS

    # and the model learned
    assert all(h["val_loss"] < initial["val_loss"] for h in history[1:]), history
    assert history[-1]["val_loss"] < initial["val_loss"] - 0.5, history
    assert page.evaluate(STATE_JS)["peers"] == 0  # the page closed its peer links when it left
