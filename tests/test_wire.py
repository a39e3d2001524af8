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
