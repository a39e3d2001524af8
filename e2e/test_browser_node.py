"""A real Chromium page as a training node: WebGPU on SwiftShader, Pyodide, WebRTC to a real coordinator process.

Each test presses Contribute on the coordinator's page and checks what the coordinator recorded and what the
page shows. WebRTC tests run in a loopback-only network namespace (`./dev test` provides it).
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest

# SwiftShader's WebGPU does about 1 GFLOP/s: a small job keeps a round to about a second.
JOB = ("--inner-steps", "3", "--batch", "4", "--deadline-seconds", "300")
SCREENSHOT_DIR = Path(tempfile.gettempdir())
STATE_JS = "() => JSON.parse(JSON.stringify(window.swarmgrad.state))"


def open_page(chromium, url: str, *, webgpu: bool = True, webrtc: bool = True, query: str = ""):
    page = chromium(webgpu=webgpu, webrtc=webrtc).page()
    page.goto(f"{url}/{query}")
    page.wait_for_function("() => window.swarmgrad !== undefined")
    return page


def wait_for_state(page, condition: str, timeout_s: float) -> dict:
    """Wait until `condition` (JS over the page's node state `s`) holds; a failed node fails at once."""
    check = f"() => {{ const s = window.swarmgrad.state; return s.phase === 'failed' || ({condition}); }}"
    page.wait_for_function(check, timeout=timeout_s * 1000, polling=200)
    state = page.evaluate(STATE_JS)
    assert state["phase"] != "failed", f"the page's node failed: {state['message']}"
    return state


def accepted_updates(data_dir) -> list[tuple[int, str]]:
    with sqlite3.connect(data_dir / "state.db") as db:
        return db.execute("SELECT round, node_id FROM updates WHERE accepted = 1 ORDER BY round").fetchall()


@pytest.mark.timeout(240)
def test_browser_node_trains_two_rounds_over_webrtc(processes, chromium, loopback_namespace):
    coordinator = processes.coordinator(*JOB, "--rounds", "2")
    initial = coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    page.click("#contribute")

    # checked as soon as the channel is up: the 2-round job may end (and the page leave) a second later
    wait_for_state(page, "s.path === 'webrtc' && s.phase === 'training'", 150)
    assert page.inner_text("#path") == "direct WebRTC"
    state = wait_for_state(page, "s.updatesAccepted >= 1", 150)
    page.screenshot(path=str(SCREENSHOT_DIR / "swarmgrad-training.png"), full_page=True)

    final = coordinator.wait_for(lambda s: s["state"] == "finished", 120, "2 committed rounds")
    history = final["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(h["accepted"] == 1 and h["rejected"] == 0 for h in history[1:]), history
    # both rounds end below the start (typically 5.54 -> 4.7 -> 3.8; one CI run of 15 saw round 2 end at 4.83 after
    # a normal-looking update: an open question, written up in issue 11's note)
    assert max(history[1]["val_loss"], history[2]["val_loss"]) < initial["val_loss"] - 0.5, history
    (node,) = final["nodes"]
    assert node["kind"] == "browser" and node["updates_accepted"] == 2 and node["last_path"] == "webrtc"
    assert node["id"] == state["nodeId"]

    # the job's end reaches the page as a goodbye; it shows both rounds and the validation losses it was sent
    state = wait_for_state(page, "s.phase === 'finished'", 30)
    assert state["updatesAccepted"] == 2
    assert [r["round"] for r in state["roundsClosed"]] == [1, 2]
    assert [v for _, v in state["valLoss"]] == pytest.approx([h["val_loss"] for h in history])
    assert len(state["localLoss"]) == 2 * 3  # one point per inner step
    # round 1's model came as the snapshot's blobs; round 2's as the int8 delta, applied in Pyodide to the hash
    assert [(m["round"], m["source"]) for m in state["models"]] == [(1, "blobs"), (2, "delta")]
    assert state["models"][1]["bytes"] < state["models"][0]["bytes"] / 3.5
    assert page.inner_text("#accepted") == "2"

    # every ledger entry about this node reached the page as a receipt whose signature the page verified
    ledger = coordinator.status_of(f"/api/ledger?node={node['id']}")
    booked = [e["seq"] for e in ledger["entries"] if e["kind"] in ("reward", "slash")]
    assert booked, "two accepted updates that lowered the loss earn at least one reward"
    assert [r["seq"] for r in state["receipts"]] == booked
    assert state["balance"] == node["balance"] > 0
    assert page.inner_text("#balance") == f"{node['balance'] / 1e6:,.6f} credits"
    assert page.locator("#receipts tbody tr").count() == len(booked)


@pytest.mark.timeout(240)
def test_browser_node_and_torch_trainer_train_in_the_same_rounds(processes, chromium, loopback_namespace):
    # int8 on the wire: the page encodes with the stdlib codec and error feedback, the trainer with torch; both must
    # be accepted
    coordinator = processes.coordinator(*JOB, "--codec", "int8")
    coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    page.click("#contribute")
    coordinator.wait_for(lambda s: any(n["kind"] == "browser" and n["path"] == "webrtc" for n in s["nodes"]), 120,
                         "the browser node on a WebRTC data channel")
    trainer = processes.trainer(coordinator.url)

    # a round with both nodes assigned waits for both updates (the deadline is far away)
    status = coordinator.wait_for(lambda s: sum(h["accepted"] == 2 for h in s["history"]) >= 2, 150,
                                  "two rounds with both updates accepted")
    kinds = {n["kind"]: n for n in status["nodes"]}
    assert set(kinds) == {"browser", "trainer"}
    assert kinds["trainer"]["path"] == "webrtc" and kinds["browser"]["path"] == "webrtc"
    by_round: dict[int, set[str]] = {}
    for round_, node_id in accepted_updates(coordinator.data_dir):
        by_round.setdefault(round_, set()).add(node_id)
    shared = [r for r, ids in by_round.items() if ids == {kinds["browser"]["id"], kinds["trainer"]["id"]}]
    assert len(shared) >= 2, by_round
    assert all(h["rejected"] == 0 for h in status["history"]), status["history"]
    n = status["job"]["params"]
    int8_bytes = 4 * -(-n // 256) + n  # a float32 scale per 256 values, then one byte per value
    assert status["job"]["codec"] == "int8:block=256,deflate=true"
    # every payload inflated to exactly int8_bytes (else rejected), and deflate made each one smaller
    with sqlite3.connect(coordinator.data_dir / "state.db") as db:
        sizes = db.execute("SELECT node_id, bytes FROM updates WHERE accepted = 1").fetchall()
    assert {node for node, _ in sizes} == {kinds["browser"]["id"], kinds["trainer"]["id"]}
    assert all(n / 2 < size < int8_bytes for _, size in sizes), sizes

    # Stop leaves cleanly: the coordinator hears the goodbye and the page says it stopped
    page.click("#stop")
    state = wait_for_state(page, "s.phase === 'stopped'", 60)
    assert state["updatesAccepted"] >= 2
    coordinator.wait_for(lambda s: all(n["state"] == "offline" for n in s["nodes"] if n["kind"] == "browser"), 30,
                         "the browser node gone")
    assert trainer.proc.poll() is None  # the trainer trains on alone

    # Contribute again: the key kept in IndexedDB makes it the same node, not a new one
    accepted_before = state["updatesAccepted"]
    page.click("#contribute")
    state = wait_for_state(page, f"s.updatesAccepted > {accepted_before}", 120)
    assert state["nodeId"] == kinds["browser"]["id"]
    browsers = [n for n in coordinator.status()["nodes"] if n["kind"] == "browser"]
    assert [n["id"] for n in browsers] == [kinds["browser"]["id"]]


@pytest.mark.timeout(180)
def test_browser_node_falls_back_to_the_websocket_when_no_data_channel_opens(processes, chromium,
                                                                            loopback_namespace):
    coordinator = processes.coordinator(*JOB)  # no round limit: the page stays joined while the test looks at it
    coordinator.wait_ready()
    # without the loopback WebRTC flags Chromium finds no ICE candidate in this namespace: no channel opens
    page = open_page(chromium, coordinator.url, webrtc=False)
    page.click("#contribute")
    state = wait_for_state(page, "s.updatesAccepted >= 1", 120)
    assert state["path"] == "websocket"
    assert page.inner_text("#path") == "WebSocket fallback"
    status = coordinator.wait_for(lambda s: s["round"] >= 1, 60, "the round committed")
    assert status["history"][1]["accepted"] == 1
    assert [n["last_path"] for n in status["nodes"]] == ["websocket"]


NO_WEBGPU = {
    # the flag leaves navigator.gpu in place, but no adapter comes back
    "adapter_refused": ([], "found no usable GPU adapter"),
    # a browser without the API at all
    "api_missing": (["delete Navigator.prototype.gpu;"], "does not offer WebGPU"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(NO_WEBGPU))
def test_without_webgpu_contribute_says_so_and_what_to_do(processes, chromium, case):
    init_scripts, reason = NO_WEBGPU[case]
    coordinator = processes.coordinator()
    coordinator.wait_ready()
    page = chromium(webgpu=False, webrtc=False).page()
    for script in init_scripts:
        page.add_init_script(script)
    page.goto(coordinator.url + "/")
    page.click("#contribute")
    page.wait_for_selector("#message.error", timeout=30_000)
    text = page.inner_text("#message")
    assert reason in text
    assert "Chrome or Edge" in text and "WebGPU" in text
    assert f"python -m server trainer --coordinator {coordinator.url}" in text
    state = page.evaluate(STATE_JS)
    assert state["phase"] == "failed" and state["nodeId"] is None  # it stopped before joining anything
    assert page.is_enabled("#contribute")
    assert coordinator.status()["nodes"] == []
