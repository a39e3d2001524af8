"""The wire format: round trips, chunking at the 256 KiB message limit, and typed errors for malformed input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import wire
from shared.wire import (CHUNK_DATA_BYTES, MAX_MESSAGE_BYTES, ChecksumMismatch, FieldError, Hello, LimitExceeded,
                         MalformedFrame, PayloadAssembler, PayloadHeader, RoundOpen, UnknownMessageType, Update,
                         VersionMismatch, WireError, decode_message, payload_frames)

hexes = lambda n: st.text(alphabet="0123456789abcdef", min_size=n, max_size=n)  # noqa: E731
counts = st.integers(min_value=0, max_value=2**40)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def updates(draw):
    return Update(node_id=draw(hexes(64)), round=draw(counts), model_hash=draw(hexes(64)), tokens=draw(counts),
                  inner_steps=draw(st.integers(0, 10_000)), loss_first=draw(finite), loss_last=draw(finite),
                  codec={"name": "fp32", "params": {}}, num_values=draw(st.integers(1, 2**30)),
                  transfer_id=draw(st.integers(0, 2**32 - 1)), payload_sha256=draw(hexes(64)),
                  payload_bytes=draw(st.integers(1, wire.MAX_PAYLOAD_BYTES)), signature=draw(hexes(128)))


@given(updates())
@settings(max_examples=60)
def test_update_round_trips_through_json(u):
    assert decode_message(u.encode()) == u


@given(hexes(64), st.sampled_from(["trainer", "browser"]), hexes(64), hexes(128), st.text(max_size=200))
@settings(max_examples=60)
def test_hello_round_trips(node_id, kind, nonce, sig, agent):
    h = Hello(node_id, kind, nonce, sig, agent)
    assert decode_message(h.encode()) == h


def test_every_message_type_is_registered_once():
    assert len(wire.MESSAGE_TYPES) == len(set(wire.MESSAGE_TYPES.values()))
    assert all(cls.TYPE == name for name, cls in wire.MESSAGE_TYPES.items())


def valid_hello_dict() -> dict:
    return Hello("a" * 64, "trainer", "b" * 64, "c" * 128).to_dict()


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d.update(v=2), VersionMismatch),
    (lambda d: d.pop("v"), VersionMismatch),
    (lambda d: d.update(type="nope"), UnknownMessageType),
    (lambda d: d.pop("nonce"), FieldError),
    (lambda d: d.update(kind="miner"), FieldError),
    (lambda d: d.update(node_id="A" * 64), FieldError),
    (lambda d: d.update(node_id="a" * 63), FieldError),
    (lambda d: d.update(signature=12), FieldError),
    (lambda d: d.update(extra=1), FieldError),
    (lambda d: d.update(agent="x" * 5000), FieldError),
    (lambda d: d.update(v=True), VersionMismatch),  # true == 1 in Python, but it is not the version
    (lambda d: d.update(v=1.0), VersionMismatch),
    (lambda d: d.update(v="1"), VersionMismatch),
    (lambda d: d.update(type=["hello"]), UnknownMessageType),  # unhashable: a TypeError once
    (lambda d: d.update(type={"hello": 1}), UnknownMessageType),
    (lambda d: d.update(type=None), UnknownMessageType),
    (lambda d: d.update(agent="\ud800"), FieldError),  # a lone surrogate: valid JSON, never valid UTF-8
    (lambda d: d.update(agent="ok \udfff"), FieldError),
    (lambda d: d.update(nonce="\ud800" * 64), FieldError),
])
def test_malformed_fields_get_typed_errors(mutate, error):
    d = valid_hello_dict()
    mutate(d)
    with pytest.raises(error):
        decode_message(json.dumps(d))


@pytest.mark.parametrize("frame, error", [
    ("{", MalformedFrame),
    ("[]", MalformedFrame),
    (b"\xff\xfe", MalformedFrame),
    ("x" * (wire.MAX_CONTROL_BYTES + 1), LimitExceeded),
])
def test_non_messages_get_typed_errors(frame, error):
    with pytest.raises(error):
        decode_message(frame)


def test_a_lone_surrogate_inside_an_object_field_is_refused_with_its_place():
    d = wire.Welcome("a" * 64, "b" * 64, {"model": "tiny", "notes": ["fine", "bad \udc00"]}, 0).to_dict()
    with pytest.raises(FieldError, match=r"\['job'\]\['notes'\]\[1\]"):
        decode_message(json.dumps(d))
    d["job"] = {"\ud800": 1}
    with pytest.raises(FieldError, match="its key"):
        decode_message(json.dumps(d))


def test_surrogate_pairs_are_text_and_decode():
    h = Hello("a" * 64, "trainer", "b" * 64, "c" * 128, "node \U0001f600")
    assert "\\ud83d\\ude00" in json.dumps(h.to_dict())  # how json.dumps writes it: one escaped pair
    assert decode_message(json.dumps(h.to_dict())) == h


@pytest.mark.parametrize("frame", [
    "\ud800",  # a str that holds a lone surrogate itself, not as an escape
    b'"\xed\xa0\x80"',  # a surrogate encoded as if UTF-8 (CESU-8), which json.loads would let through
    b'\xef\xbb\xbf{"v": 1}',  # a UTF-8 byte order mark
])
def test_text_that_is_not_utf8_is_malformed(frame):
    with pytest.raises(MalformedFrame):
        decode_message(frame)


def test_deep_nesting_is_refused_before_json_recurses():
    with pytest.raises(LimitExceeded, match="nested more than 32"):
        decode_message("[" * 60_000)  # 60 KB, under the size limit; json.loads would raise RecursionError
    with pytest.raises(LimitExceeded, match="nested more than 32"):
        decode_message("[" * 60_000 + "]" * 5_000)
    with pytest.raises(LimitExceeded, match="exceeds"):
        decode_message("[" * 100_000)  # 10^5 levels do not fit in a control message at all
    d = valid_hello_dict()
    with pytest.raises(LimitExceeded, match="nested"):  # 33 levels with the message's own object
        decode_message(json.dumps({**d, "agent": nested(wire.MAX_JSON_DEPTH)}))
    with pytest.raises(FieldError, match="agent must be a string"):  # 32 levels in all parse, then fail the type
        decode_message(json.dumps({**d, "agent": nested(wire.MAX_JSON_DEPTH - 1)}))


def nested(levels: int) -> list:
    """A list `levels` deep: [] is 1."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ('"[[["', 0), ("[]", 1), ("{}", 1), ('[{"a": [1, {"b": []}]}]', 5), ("[[], [[]], []]", 3),
    ('["]", ["\\"[", "\\\\"], []]', 2),  # escaped quotes and backslashes inside strings
    ('["unterminated [[[', 1), ("]]][[", 0),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert wire.json_depth(text) == depth


def test_brackets_inside_strings_do_not_count_as_nesting():
    h = Hello("a" * 64, "trainer", "b" * 64, "c" * 128, "[{" * 100)
    assert decode_message(h.encode()) == h


@pytest.mark.parametrize("url", ["http://10.0.0.5:8100", "http://trainer-3.lan:1", "http://[::1]:65535",
                                 "http://" + "a" * 116 + ":8100"])
def test_a_blob_url_is_http_host_and_port(url):
    hello = Hello("a" * 64, "trainer", "b" * 64, "c" * 128, blob_url=url)
    assert decode_message(hello.encode()) == hello
    msg = RoundOpen(1, "a" * 64, "b" * 128, {}, 0, 1.0, peers=["d" * 64], peer_urls={"d" * 64: url})
    assert decode_message(msg.encode()) == msg


@pytest.mark.parametrize("url", ["https://10.0.0.5:8100", "http://10.0.0.5", "http://10.0.0.5:0", "http://h:65536",
                                 "http://h:8100/", "http://h:8100/blobs", "http://user@h:8100", "http://h:8100?x",
                                 "http://-h:8100", "http://h :8100", "ftp://h:8100", "http://h:8100\n",
                                 "http://" + "a" * 117 + ":8100", ":8100"])
def test_anything_else_as_a_blob_url_is_refused(url):
    hello = Hello("a" * 64, "trainer", "b" * 64, "c" * 128).to_dict()
    with pytest.raises(FieldError):
        decode_message(json.dumps({**hello, "blob_url": url}))
    round_open = RoundOpen(1, "a" * 64, "b" * 128, {}, 0, 1.0).to_dict()
    with pytest.raises(FieldError):
        decode_message(json.dumps({**round_open, "peer_urls": {"d" * 64: url}}))


def test_peer_urls_are_keyed_by_node_ids_and_bounded():
    round_open = RoundOpen(1, "a" * 64, "b" * 128, {}, 0, 1.0).to_dict()
    for peer_urls in ({"not-a-node": "http://h:1"}, {"d" * 64: 7},
                      {hashlib.sha256(bytes([i])).hexdigest(): "http://h:1" for i in range(wire.MAX_PEERS + 1)}):
        with pytest.raises(FieldError):
            decode_message(json.dumps({**round_open, "peer_urls": peer_urls}))


def test_integer_fields_refuse_booleans_and_floats():
    d = RoundOpen(1, "a" * 64, "b" * 128, {}, 0, 1.0).to_dict()
    for bad in (True, 1.5, "1"):
        with pytest.raises(FieldError):
            decode_message(json.dumps({**d, "round": bad}))


def test_non_finite_numbers_are_refused():
    d = RoundOpen(1, "a" * 64, "b" * 128, {}, 0, 1.0).to_dict()
    text = json.dumps(d).replace('"deadline": 1.0', '"deadline": NaN').replace('"deadline":1.0', '"deadline":NaN')
    with pytest.raises(FieldError):
        decode_message(text)


@given(st.text(max_size=300))
@settings(max_examples=200)
def test_arbitrary_text_never_escapes_as_anything_but_a_wire_error(text):
    try:
        decode_message(text)
    except WireError:
        pass


# Hostile frames: valid messages bent one field at a time, arbitrary JSON, deep nesting, lone surrogates, bytes.
VALID_MESSAGES = [
    Hello("a" * 64, "trainer", "b" * 64, "c" * 128, "agent"),
    RoundOpen(1, "a" * 64, "b" * 128, {"inner_steps": 2}, 0, 1.0),
    PayloadHeader(7, "update", 10, 1, "d" * 64, {"round": 1}),
    wire.Sdp("a" * 64, "b" * 64, "offer", "v=0"),
    wire.Error("bad_field", "what", True),
    wire.PathSelect("websocket"),
    wire.Bye(),
]
odd_text = st.text(max_size=12) | st.sampled_from(["\ud800", "x\udfff", "\U0001f600", "", "a" * 5000])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4), max_leaves=12)
field_names = st.sampled_from(["v", "type", "node_id", "kind", "nonce", "agent", "round", "config", "meta",
                               "total_bytes", "num_chunks", "sdp", "code", "fatal", "path", "extra"])


@st.composite
def bent_messages(draw) -> str:
    d = draw(st.sampled_from(VALID_MESSAGES)).to_dict()
    for _ in range(draw(st.integers(1, 3))):
        name = draw(field_names)
        if draw(st.booleans()):
            d[name] = draw(json_values)
        else:
            d.pop(name, None)
    return json.dumps(d)


@st.composite
def deep_frames(draw) -> str:
    """Up to 100 KB: past MAX_CONTROL_BYTES, and far below the coordinator's WebSocket frame limit."""
    opener = draw(st.sampled_from(["[", '{"a":', '["\\"]",']))
    depth = draw(st.integers(0, 100_000 // (len(opener) + 1)))
    return opener * depth + draw(st.sampled_from(["", "1", "]" * depth]))


hostile_frames = (bent_messages() | json_values.map(json.dumps) | deep_frames() | st.text(max_size=200)
                  | st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: wire.CHUNK_MAGIC + b))


@given(hostile_frames)
@settings(max_examples=300, deadline=None)
def test_hostile_frames_give_a_message_or_a_wire_error_and_nothing_else(frame):
    receiver = wire.FrameReceiver(1 << 20, burst=1000)
    try:
        item = receiver.feed(frame)
    except WireError as e:
        assert e.code in {"malformed", "version", "unknown_type", "bad_field", "limit", "checksum"}
        return
    assert item is None or isinstance(item, (wire.Message, tuple))


def send_and_receive(data: bytes) -> tuple[PayloadHeader, list[bytes], bytes]:
    header, chunks = payload_frames(9, "model", data, {"round": 1})
    frames = list(chunks)
    receiver = PayloadAssembler()
    receiver.begin(decode_message(header.encode()))
    results = [receiver.add_chunk(f) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    return header, frames, results[-1][1]


@pytest.mark.parametrize("size", [1, CHUNK_DATA_BYTES - 1, CHUNK_DATA_BYTES, CHUNK_DATA_BYTES + 1,
                                  MAX_MESSAGE_BYTES - 1, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1,
                                  3 * CHUNK_DATA_BYTES + 17])
def test_payload_chunks_never_exceed_one_webrtc_message(size):
    data = os.urandom(size)
    header, frames, received = send_and_receive(data)
    assert received == data
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert all(len(f) <= MAX_MESSAGE_BYTES for f in frames)
    assert len(frames) == -(-size // CHUNK_DATA_BYTES)
    assert len(frames[0]) == min(size, CHUNK_DATA_BYTES) + wire.CHUNK_HEADER.size


def test_a_full_chunk_is_exactly_the_message_limit():
    _, frames, _ = send_and_receive(os.urandom(2 * CHUNK_DATA_BYTES))
    assert [len(f) for f in frames] == [MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES]


def begun(data: bytes, max_bytes: int = wire.MAX_PAYLOAD_BYTES):
    header, chunks = payload_frames(3, "update", data)
    receiver = PayloadAssembler(max_bytes)
    receiver.begin(header)
    return receiver, header, list(chunks)


def test_corrupted_payload_fails_its_checksum():
    receiver, _, frames = begun(os.urandom(1000))
    bad = bytearray(frames[0])
    bad[-1] ^= 1
    with pytest.raises(ChecksumMismatch):
        receiver.add_chunk(bytes(bad))
    assert receiver.in_flight == 0


def test_truncated_chunk_is_refused_and_the_transfer_dropped():
    receiver, _, frames = begun(os.urandom(CHUNK_DATA_BYTES + 10))
    with pytest.raises(FieldError, match="expected"):
        receiver.add_chunk(frames[0][:-1])
    assert receiver.in_flight == 0


def test_duplicate_and_out_of_range_chunks_are_refused():
    receiver, _, frames = begun(os.urandom(CHUNK_DATA_BYTES + 10))
    receiver.add_chunk(frames[0])
    with pytest.raises(FieldError, match="duplicate"):
        receiver.add_chunk(frames[0])
    receiver, _, frames = begun(os.urandom(10))
    forged = wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, 3, 5) + b"x" * 10
    with pytest.raises(FieldError, match="out of range"):
        receiver.add_chunk(forged)


def test_oversize_frames_and_bad_magic_are_refused():
    receiver, _, _ = begun(os.urandom(10))
    with pytest.raises(LimitExceeded):
        receiver.add_chunk(wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, 3, 0) + bytes(MAX_MESSAGE_BYTES))
    with pytest.raises(MalformedFrame):
        receiver.add_chunk(b"XXXX" + bytes(20))
    with pytest.raises(MalformedFrame):
        receiver.add_chunk(b"SG")
    with pytest.raises(FieldError, match="unknown transfer"):
        receiver.add_chunk(wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, 77, 0) + b"x")


def test_declared_size_is_checked_before_anything_is_allocated():
    header, _ = payload_frames(1, "model", b"x" * 100)
    receiver = PayloadAssembler(max_bytes=99)
    with pytest.raises(LimitExceeded):
        receiver.begin(header)
    huge = dataclasses.replace(header, total_bytes=wire.MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(LimitExceeded):
        PayloadAssembler().begin(huge)
    inconsistent = dataclasses.replace(header, num_chunks=2)
    with pytest.raises(FieldError, match="chunks"):
        PayloadAssembler().begin(inconsistent)


def test_too_many_transfers_in_flight_are_refused():
    receiver = PayloadAssembler(max_in_flight=2)
    for tid in (1, 2):
        receiver.begin(payload_frames(tid, "model", b"abc")[0])
    with pytest.raises(LimitExceeded):
        receiver.begin(payload_frames(3, "model", b"abc")[0])
    with pytest.raises(FieldError, match="already"):
        receiver.begin(payload_frames(1, "model", b"abc")[0])


def test_a_failed_transfer_leaves_others_intact():
    receiver = PayloadAssembler()
    h1, c1 = payload_frames(1, "model", b"first")
    h2, c2 = payload_frames(2, "model", b"second")
    receiver.begin(h1)
    receiver.begin(h2)
    bad = bytearray(next(c1))
    bad[-1] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        receiver.add_chunk(bytes(bad))
    assert receiver.add_chunk(next(c2)) == (h2, b"second")


def test_a_flood_of_control_messages_is_refused_beyond_the_rate_limit():
    now = [0.0]
    receiver = wire.FrameReceiver(1024, rate=10.0, burst=5, clock=lambda: now[0])
    bye = wire.Bye("x").encode()
    for _ in range(5):
        assert receiver.feed(bye) == wire.Bye("x")
    with pytest.raises(LimitExceeded, match="per second"):
        receiver.feed(bye)
    now[0] += 0.1  # one token back after 1/rate seconds
    assert receiver.feed(bye) == wire.Bye("x")
    with pytest.raises(LimitExceeded):
        receiver.feed(bye)


def test_an_sdp_may_be_longer_than_other_strings_up_to_its_own_limit():
    from shared.wire import MAX_SDP, MAX_STRING, Sdp

    long_sdp = "a=candidate " * (2 * MAX_STRING // 12)  # a browser's offer with many candidates
    assert MAX_STRING < len(long_sdp) <= MAX_SDP
    assert decode_message(Sdp("a" * 64, "b" * 64, "offer", long_sdp).encode()).sdp == long_sdp
    with pytest.raises(FieldError):
        decode_message(json.dumps({"v": 1, "type": "error", "code": "x", "message": "m" * (MAX_STRING + 1)}))


def test_a_hello_carries_a_name_and_team_and_signs_them_only_when_set():
    named = Hello("a" * 64, "trainer", "b" * 64, "c" * 128, name="Ada's GPU, \"one\"", team="Lab 7 \u00e9\U0001f600")
    assert decode_message(named.encode()) == named
    assert named.signing_fields() == {"node_id": "a" * 64, "kind": "trainer", "nonce": "b" * 64,
                                      "name": "Ada's GPU, \"one\"", "team": "Lab 7 \u00e9\U0001f600"}
    # without them a hello signs what it signed before they existed, so an older node's hello still verifies
    assert Hello("a" * 64, "trainer", "b" * 64, "c" * 128).signing_fields() == {
        "node_id": "a" * 64, "kind": "trainer", "nonce": "b" * 64}
    assert dataclasses.replace(named, name="Mallory").signing_fields() != named.signing_fields()


@pytest.mark.parametrize("field", ["name", "team"])
@pytest.mark.parametrize("value", ["x" * (wire.MAX_DISPLAY_NAME + 1), "line\nbreak", "tab\there", "bell\x07",
                                   " leading", "trailing ", "nbsp\u00a0inside", "rtl\u202eoverride"])
def test_a_name_or_team_that_is_too_long_or_not_printable_text_is_refused(field, value):
    hello = Hello("a" * 64, "trainer", "b" * 64, "c" * 128).to_dict()
    with pytest.raises(FieldError, match=field):
        decode_message(json.dumps({**hello, field: value}))
    assert decode_message(json.dumps({**hello, field: "x" * wire.MAX_DISPLAY_NAME})).to_dict()[field] == "x" * 40


def test_the_contributor_page_bounds_a_name_as_the_wire_does():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "browser" / "node.js").read_text()
    assert re.search(r"const MAX_DISPLAY_NAME = (\d+);", page).group(1) == str(wire.MAX_DISPLAY_NAME)
