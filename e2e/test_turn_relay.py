"""A real Chromium page forced to TURN relay candidates (`?relay=1`) trains through a real TURN server (coturn on
loopback) named by the coordinator's --ice-server, and both ends see the relayed path.

Runs in a loopback-only network namespace; skips only where coturn's turnserver is not installed.
"""

from __future__ import annotations

import pytest

from e2e.test_browser_node import JOB, open_page, wait_for_state
from tests.turn import TURN_PASSWORD, TURN_USER, running_turn_server

# The pairs ICE selected, read straight from getStats (not through the page's own reading of it).
SELECTED_PAIRS_JS = """async () => {
  const pc = window.swarmgrad.peerConnection();
  if (!pc) return null;
  const stats = await pc.getStats();
  return [...stats.values()]
    .filter((s) => s.type === "candidate-pair" && s.nominated && s.state === "succeeded")
    .map((p) => ({ local: stats.get(p.localCandidateId).candidateType,
                   remote: stats.get(p.remoteCandidateId).candidateType }));
}"""


@pytest.fixture
def turn_server(tmp_path, loopback_namespace, request):
    """coturn for one test; asked for before `processes`, so it stops after them (see tests/turn.py)."""
    yield from running_turn_server(tmp_path, request)


@pytest.mark.timeout(240)
def test_a_browser_forced_to_relay_trains_through_turn(turn_server, processes, chromium):
    coordinator = processes.coordinator(*JOB, "--ice-server", turn_server.url, "--turn-username", TURN_USER,
                                        "--turn-password", TURN_PASSWORD)
    coordinator.wait_ready()
    page = open_page(chromium, coordinator.url, query="?relay=1")
    assert page.evaluate("() => window.swarmgrad.rtcConfiguration().iceTransportPolicy") == "relay"
    page.click("#contribute")

    state = wait_for_state(page, "s.path === 'webrtc-relay' && s.updatesAccepted >= 1", 150)
    assert page.inner_text("#path") == "WebRTC through TURN"
    status = coordinator.wait_for(lambda s: s["round"] >= 1, 60, "the round committed")
    assert status["history"][1]["accepted"] == 1 and status["history"][1]["rejected"] == 0, status["history"]
    (node,) = status["nodes"]
    assert node["id"] == state["nodeId"] and node["kind"] == "browser"
    assert node["path"] == "webrtc-relay" and node["last_path"] == "webrtc-relay"

    # the browser's own view: every nominated, succeeded pair starts at its TURN allocation
    pairs = page.evaluate(SELECTED_PAIRS_JS)
    assert pairs and all(p["local"] == "relay" for p in pairs), pairs
    assert page.evaluate("() => window.swarmgrad.rtcConfiguration().iceServers") == [
        {"urls": [turn_server.url], "username": TURN_USER, "credential": TURN_PASSWORD}]
