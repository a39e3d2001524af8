"""A real coordinator process under hostile input, on its signaling socket and its HTTP API: every bad frame gets
a typed Error and a 1008 close, a refused hello leaves no node behind, the store does not change, the process
keeps answering, and its log holds no traceback; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request

import pytest
import websockets
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiortc import RTCSessionDescription

from bench.bench_fuzz import expected_code
from server.net import rtc
from server.keys import NodeKey
from shared import wire
from shared.identity import signing_bytes
from shared.wire import Bye, Challenge, Error, Hello, Sdp, Welcome, decode_message
from tests.conftest import Coordinator
from tests.test_wire import hostile_frames, nested

CLOSE_POLICY = 1008  # what a peer's bad input must get; 1006 (no close frame) means the server broke
# Nodes that join properly, to send bad frames after their hello; taking turns keeps each key far below the
# coordinator's limit on reconnects per key and minute (every bad frame costs its connection).
MEMBERS = [NodeKey() for _ in range(4)]
next_member = itertools.cycle(MEMBERS).__next__


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, module_store_url):
    """One coordinator for the whole module (starting one takes seconds), once on SQLite and once on PostgreSQL;
    no round closes while it runs."""
    tmp = tmp_path_factory.mktemp("hostile")
    c = Coordinator(tmp, tmp / "data", "--deadline-seconds", "600", store=module_store_url)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def still_healthy(coordinator):
    """After each test: the process lives, /api/status answers, and nothing it logged is a traceback."""
    yield
    assert coordinator.proc.poll() is None, coordinator.output()[-4000:]
    assert coordinator.status()["state"] == "training"
    assert "Traceback" not in coordinator.output(), coordinator.output()[-6000:]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def hello_text(key: NodeKey, nonce: str, **bent) -> str:
    """A hello that `key` signed for `nonce`, as JSON, with `bent` fields replaced after signing."""
    hello = Hello(key.node_id, "trainer", nonce, "0" * 128, "hostile-input test")
    signed = Hello(**{**hello.__dict__, "signature": key.sign(signing_bytes("hello", hello.signing_fields()))})
    return json.dumps({**signed.to_dict(), **bent})


async def refusal(url: str, frame, member: NodeKey | None = None) -> tuple[Error, int]:
    """Send `frame` (after a proper hello as `member`, if given); the Error that comes back and the close code.

    `frame` may be a function of the challenge's nonce, for frames that are hellos."""
    async with websockets.connect(url.replace("http", "ws") + "/ws", max_size=1 << 20) as ws:
        challenge = decode_message(await asyncio.wait_for(ws.recv(), 10))
        assert isinstance(challenge, Challenge)
        if member is not None:
            await ws.send(hello_text(member, challenge.nonce))
            assert isinstance(decode_message(await asyncio.wait_for(ws.recv(), 10)), Welcome)
        await ws.send(frame(challenge.nonce) if callable(frame) else frame)
        reply = decode_message(await asyncio.wait_for(ws.recv(), 10))
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.exceptions.ConnectionClosed as closed:
            return reply, closed.rcvd.code if closed.rcvd is not None else 1006
        raise AssertionError(f"the socket stayed open after {reply}")


def node_ids(coordinator: Coordinator) -> set[str]:
    return {n["id"] for n in coordinator.status()["nodes"]}


BEFORE_HELLO = {
    "binary frame": (lambda nonce, key: b"\x00\x01 not a hello", "malformed"),
    "chunk-shaped binary frame": (lambda nonce, key: wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, 1, 0), "malformed"),
    "list-typed type": (lambda nonce, key: hello_text(key, nonce, type=["hello"]), "unknown_type"),
    "60,000 levels of nesting": (lambda nonce, key: "[" * 60_000, "limit"),
    "nesting inside a hello": (lambda nonce, key: hello_text(key, nonce, agent=nested(wire.MAX_JSON_DEPTH)), "limit"),
    "lone surrogate in agent": (lambda nonce, key: hello_text(key, nonce, agent="\ud800"), "bad_field"),
    "version true": (lambda nonce, key: hello_text(key, nonce, v=True), "version"),
    "version 1.0": (lambda nonce, key: hello_text(key, nonce, v=1.0), "version"),
    "version '1'": (lambda nonce, key: hello_text(key, nonce, v="1"), "version"),
    "not a hello": (lambda nonce, key: Bye("hi").encode(), "protocol"),
}


@pytest.mark.parametrize("case", BEFORE_HELLO, ids=list(BEFORE_HELLO))
def test_a_bad_frame_before_hello_gets_a_typed_error_a_1008_close_and_no_node(coordinator, case):
    build, code = BEFORE_HELLO[case]
    key = NodeKey()
    error, close_code = run(refusal(coordinator.url, lambda nonce: build(nonce, key)))
    assert (error.code, error.fatal, close_code) == (code, True, CLOSE_POLICY), error.message
    assert key.node_id not in node_ids(coordinator)


AFTER_HELLO = {
    "binary garbage": (b"\x00" * 20, "malformed"),
    "a chunk of no transfer": (wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, 5, 0) + b"x", "bad_field"),
    "list-typed type": ('{"v": 1, "type": ["bye"]}', "unknown_type"),
    "60,000 levels of nesting": ("[" * 60_000, "limit"),
    "lone surrogate in a string field": ('{"v": 1, "type": "bye", "reason": "\\ud800"}', "bad_field"),
    "version true": ('{"v": true, "type": "bye"}', "version"),
    "version 1.0": ('{"v": 1.0, "type": "bye"}', "version"),
}


@pytest.mark.parametrize("case", AFTER_HELLO, ids=list(AFTER_HELLO))
def test_a_bad_frame_after_hello_gets_a_typed_error_and_a_1008_close(coordinator, case):
    frame, code = AFTER_HELLO[case]
    member = next_member()
    error, close_code = run(refusal(coordinator.url, frame, member=member))
    assert (error.code, error.fatal, close_code) == (code, True, CLOSE_POLICY), error.message
    (node,) = [n for n in coordinator.status()["nodes"] if n["id"] == member.node_id]
    assert node["state"] == "offline"  # its session ended with its socket


def test_a_bad_frame_on_the_data_channel_gets_a_typed_error_and_closes_the_channel(coordinator, loopback_namespace):
    async def scenario() -> Error:
        rtc.restrict_ice_hosts(["127.0.0.1"])
        member = next_member()
        async with websockets.connect(coordinator.url.replace("http", "ws") + "/ws") as ws:
            challenge = decode_message(await ws.recv())
            await ws.send(hello_text(member, challenge.nonce))
            assert isinstance(decode_message(await ws.recv()), Welcome)
            pc = rtc.new_peer_connection()
            channel = pc.createDataChannel("swarmgrad", ordered=True)
            inbox, opened, closed = asyncio.Queue(), asyncio.Event(), asyncio.Event()
            channel.on("open", opened.set)
            channel.on("message", inbox.put_nowait)
            channel.on("close", closed.set)
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send(Sdp(member.node_id, challenge.coordinator_id, "offer", pc.localDescription.sdp).encode())
            while not isinstance(answer := decode_message(await asyncio.wait_for(ws.recv(), 20)), Sdp):
                pass
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
            await asyncio.wait_for(opened.wait(), 20)
            channel.send('{"v": 1, "type": ["update"]}')
            while not isinstance(frame := await asyncio.wait_for(inbox.get(), 20), str) or not isinstance(
                    error := decode_message(frame), Error):
                pass
            await asyncio.wait_for(closed.wait(), 20)
            await pc.close()
            return error

    error = run(scenario())
    assert (error.code, error.fatal) == ("unknown_type", True)


def store_snapshot(coordinator: Coordinator) -> dict:
    """What hostile input must never change: the nodes (but when they were last seen), the ledger, balances,
    updates, and the in-memory ledger's head."""
    with coordinator.read_store() as books:
        tables = {
            "nodes": sorted(({k: v for k, v in n.items() if k != "last_seen"} for n in books.nodes()),
                            key=lambda n: n["id"]),
            "ledger": books.ledger_entries(),
            "balances": books.balances(),
            "updates": books.updates(),
        }
    return {**tables, "head": coordinator.status_of("/api/ledger")["head"]}


def warning_lines(coordinator: Coordinator) -> int:
    return coordinator.output().count("closing the signaling socket")


def test_fuzzed_frames_get_typed_errors_and_change_nothing(coordinator):
    for member in MEMBERS:  # a member's first join posts its stake: that comes before the snapshot
        run(refusal(coordinator.url, "{}", member=member))
    before, lines_before, started = store_snapshot(coordinator), warning_lines(coordinator), time.monotonic()
    sent = []

    @given(frame=hostile_frames, after_hello=st.integers(0, 2).map(lambda i: i == 0))
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])
    def one_frame(frame, after_hello):
        code = expected_code(frame, after_hello)
        assume(code is not None)
        error, close_code = run(refusal(coordinator.url, frame, member=next_member() if after_hello else None))
        sent.append(code)
        assert (error.code, error.fatal, close_code) == (code, True, CLOSE_POLICY), (frame[:200], error.message)

    one_frame()
    assert len(sent) >= 30
    assert store_snapshot(coordinator) == before
    # one warning per refused connection at most, and no more than the log limiter's budget allows
    elapsed = time.monotonic() - started
    assert warning_lines(coordinator) - lines_before <= min(len(sent), 20 + 5 * elapsed + 1)


def http(coordinator: Coordinator, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(coordinator.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_a_ledger_limit_that_is_not_an_integer_is_a_400_with_a_typed_error(coordinator):
    for limit in ("abc", "1.5", "9" * 5000):
        status, body = http(coordinator, f"/api/ledger?limit={limit}")
        assert (status, body["code"]) == (400, "bad_query") and "limit must be an integer" in body["error"]


def test_negative_and_huge_ledger_limits_are_bounded(coordinator):
    _, everything = http(coordinator, "/api/ledger")
    assert http(coordinator, "/api/ledger?limit=-5") == (200, {**everything, "entries": []})
    assert http(coordinator, "/api/ledger?limit=0") == (200, {**everything, "entries": []})
    assert http(coordinator, f"/api/ledger?limit={10**30}") == (200, everything)


@pytest.mark.parametrize("kind", ["proposals", "votes"])
@pytest.mark.parametrize("body, code", [
    (b"[" * 50_000, "limit"),
    (b'{"proposer": ' + b"[" * 40 + b"]" * 40 + b"}", "limit"),
    (b"{not json", "malformed"),
    (b'"\\ud800"', "bad_field"),
    (b"\xff\xfe", "malformed"),
], ids=["50,000 levels of nesting", "nesting inside a field", "not JSON", "lone surrogate", "not UTF-8"])
def test_a_hostile_governance_body_is_a_400_with_a_typed_error(coordinator, kind, body, code):
    status, answer = http(coordinator, f"/api/governance/{kind}", body)
    assert (status, answer["code"]) == (400, code), answer
