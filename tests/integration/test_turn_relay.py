"""NAT traversal through a real TURN server (coturn on loopback): the coordinator's --ice-server list reaches its
nodes, a trainer forced to relay candidates trains through it, and the coordinator reports that path.

The tests through coturn run in a loopback-only network namespace and skip only where its turnserver is not
installed.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
import websockets

from server.keys import NodeKey
from server.net import rtc
from shared.identity import signing_bytes
from shared.wire import Challenge, Hello, Welcome, decode_message
from tests.turn import TURN_PASSWORD, TURN_USER, running_turn_server

JOB = ("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "300", "--verify-share", "0")


@pytest.fixture
def turn_server(tmp_path, loopback_namespace, request):
    """coturn for one test. Ask for it before `processes`: it then stops after them, so that their peer
    connections can release their TURN allocations instead of waiting out retransmissions to a stopped server."""
    yield from running_turn_server(tmp_path, request)


def turn_options(server) -> tuple[str, ...]:
    return ("--ice-server", server.url, "--turn-username", TURN_USER, "--turn-password", TURN_PASSWORD)


async def welcome_of(ws_url: str) -> Welcome:
    """The Welcome a node gets after the signed handshake."""
    key = NodeKey()
    async with websockets.connect(ws_url) as ws:
        challenge = decode_message(await ws.recv())
        assert isinstance(challenge, Challenge)
        hello = Hello(key.node_id, "trainer", challenge.nonce, "0" * 128)
        signature = key.sign(signing_bytes("hello", hello.signing_fields()))
        await ws.send(Hello(key.node_id, "trainer", challenge.nonce, signature).encode())
        welcome = decode_message(await ws.recv())
    assert isinstance(welcome, Welcome)
    return welcome


@pytest.mark.timeout(180)
def test_a_relay_only_trainer_trains_through_turn_and_status_says_so(turn_server, processes):
    coordinator = processes.coordinator(*JOB, *turn_options(turn_server))
    coordinator.wait_ready()
    # --transport webrtc: no WebSocket fallback to hide a relay that does not work
    processes.trainer(coordinator.url, "--ice-relay-only", "--transport", "webrtc")

    status = coordinator.wait_for(lambda s: s["round"] >= 1 and s["nodes"] and s["nodes"][0]["path"] is not None,
                                  150, "a committed round with the trainer on its link")
    assert status["history"][1]["accepted"] == 1 and status["history"][1]["rejected"] == 0, status["history"]
    (node,) = status["nodes"]
    assert node["kind"] == "trainer" and node["updates_accepted"] >= 1
    assert node["path"] == "webrtc-relay" and node["last_path"] == "webrtc-relay"


@pytest.mark.timeout(180)
def test_a_trainer_with_a_direct_route_keeps_it_when_turn_is_offered(turn_server, processes):
    coordinator = processes.coordinator(*JOB, *turn_options(turn_server))
    coordinator.wait_ready()
    processes.trainer(coordinator.url, "--transport", "webrtc")

    status = coordinator.wait_for(lambda s: s["round"] >= 1 and s["nodes"] and s["nodes"][0]["path"] is not None,
                                  150, "a committed round with the trainer on its link")
    assert status["history"][1]["accepted"] == 1, status["history"]
    (node,) = status["nodes"]
    assert node["path"] == "webrtc" and node["last_path"] == "webrtc"  # host to host: ICE prefers it to a relay


@pytest.mark.timeout(60)
def test_nodes_get_the_ice_servers_with_credentials_and_status_shows_only_the_urls(processes):
    stun_url, turn_url = "stun:stun.example.org:3478", "turns:turn.example.org:443?transport=tcp"
    coordinator = processes.coordinator("--ice-server", stun_url, "--ice-server", turn_url,
                                        "--turn-username", TURN_USER, "--turn-password", TURN_PASSWORD)
    coordinator.wait_ready()

    welcome = asyncio.run(welcome_of(f"ws://127.0.0.1:{coordinator.port}/ws"))
    servers = welcome.job["ice_servers"]
    assert servers == [{"urls": [stun_url]}, {"urls": [turn_url], "username": TURN_USER, "credential": TURN_PASSWORD}]
    stun, turn = rtc.rtc_ice_servers(servers)  # what a Python node's peer connections use
    assert (stun.urls, stun.username) == ([stun_url], None)
    assert (turn.urls, turn.username, turn.credential) == ([turn_url], TURN_USER, TURN_PASSWORD)

    assert coordinator.status()["job"]["ice_servers"] == [{"urls": [stun_url]}, {"urls": [turn_url]}]
    with urllib.request.urlopen(coordinator.url + "/api/status", timeout=5) as r:
        raw = r.read().decode()
    assert TURN_PASSWORD not in raw and TURN_USER not in raw
