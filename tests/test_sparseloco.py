"""The sparseloco codec (shared/compress.py's docstring is its spec): chunked top-k, 2-bit values, packed offsets.

The stdlib reference, the trainer's torch encoder and the coordinator's numpy decoder agree byte for byte; every
decoder refuses what the encoder never writes; error feedback sends everything in the end; a swarm trains with it.
The WGSL encoder's agreement is in test_kernels_sparseloco.py.
"""

from __future__ import annotations

import math
import struct
from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.codecs import TorchErrorFeedback, decode_numpy, encode_torch
from server.sim import SimOptions, run_simulation
from shared.compress import (CodecError, CodecSpec, ErrorFeedback, decode, encode, encoded_size, format_codec,
                             max_wire_size, parse_codec, sparseloco_layout)
from shared.model import MODEL_SIZES, num_parameters

SMALL = CodecSpec("sparseloco", {"chunk": 4, "k": 2, "bits": 2})
VALUES = [0.5, -3.0, 2.0, -3.0, 1.0, -0.25]  # chunk 0 ties -3 and -3; chunk 1 holds 2 values
# levels (3, 3) and (1, 0.25); offsets 1, 3 | 0, 1 at 2 bits; codes: 3 (-, high), 1 (-, low) | 2 (+, high), 1
PAYLOAD = struct.pack("<4f", 3.0, 3.0, 1.0, 0.25) + bytes([1 | 3 << 2 | 0 << 4 | 1 << 6, 3 | 1 << 2 | 2 << 4 | 1 << 6])

SPECS = [SMALL] + [CodecSpec("sparseloco", {"chunk": chunk, "k": k, "bits": 2})
                   for chunk, k in [(5, 1), (7, 7), (16, 5), (1, 1)]]
SPECS.append(CodecSpec("sparseloco", {"chunk": 6, "k": 3, "bits": 2, "deflate": True}))

# Repeats, zeros of both signs and subnormals make ties in magnitude, inside and across chunks.
any_float32 = st.floats(-6e4, 6e4, allow_nan=False, width=32)
tie_prone = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.5, 1e-40, -1e-40])
value_lists = st.lists(st.one_of(any_float32, tie_prone), max_size=60)


def test_the_wire_is_levels_then_packed_offsets_then_packed_codes():
    assert encode(SMALL, VALUES) == PAYLOAD
    assert list(decode(SMALL, PAYLOAD, 6)) == [0.0, -3.0, 0.0, -3.0, 1.0, -0.25]


def test_default_is_top_64_of_4096_at_120_bytes_a_chunk():
    spec = parse_codec("sparseloco")
    assert spec == CodecSpec("sparseloco", {"chunk": 4096, "k": 64, "bits": 2})
    assert parse_codec("sparseloco:chunk=4096,k=64,bits=2") == spec == parse_codec(format_codec(spec))
    assert encoded_size(spec, 4096) == 8 + 64 * 12 // 8 + 64 * 2 // 8 == 120
    n = num_parameters(MODEL_SIZES["base"])  # 2672 chunks, the last one half full but still sending 64
    assert encoded_size(spec, n) == 2672 * 120 == max_wire_size(spec, n)
    assert encoded_size(spec, 0) == 0 and encoded_size(spec, 1) == 8 + 2 + 1


def test_ranks_break_ties_by_the_lower_index_and_levels_are_the_groups_medians():
    spec = CodecSpec("sparseloco", {"chunk": 8, "k": 4, "bits": 2})
    # ranked: 9 (index 0), -9 (1), 9 (4), 8.5 (7), then 7 (6), unsent; the first two are high, hi is the magnitude
    # at rank 1 and lo at rank 3
    payload = encode(spec, [9.0, -9.0, 1.0, 0.0, 9.0, -1.0, 7.0, 8.5])
    assert struct.unpack_from("<2f", payload) == (9.0, 8.5)
    assert list(decode(spec, payload, 8)) == [9.0, -9.0, 0.0, 0.0, 8.5, 0.0, 0.0, 8.5]
    # of four equal magnitudes, the three at the lowest indices are sent
    spec = CodecSpec("sparseloco", {"chunk": 8, "k": 3, "bits": 2})
    assert list(decode(spec, encode(spec, [9.0, -9.0, 1.0, 0.0, 9.0, -1.0, 7.0, 9.0]), 8)) == \
        [9.0, -9.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0]


def test_a_chunk_with_fewer_values_than_k_sends_all_of_them_and_zeros_count_as_positive():
    spec = CodecSpec("sparseloco", {"chunk": 4, "k": 3, "bits": 2})
    # chunk 1 is [-0.0, 5.0]: both sent; -0.0 ranks last, low, at lo = 0 and positive
    payload = encode(spec, [1.0, 2.0, 3.0, 4.0, -0.0, 5.0])
    assert struct.unpack_from("<4f", payload) == (4.0, 2.0, 5.0, 0.0)
    assert math.copysign(1, decode(spec, payload, 6)[4]) == 1.0


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("sparseloco:chunk=0", "chunk must be an integer in"),
        ("sparseloco:chunk=8192", "chunk must be an integer in"),
        ("sparseloco:chunk=64.5", "chunk must be an integer in"),
        ("sparseloco:k=0", "k must be an integer in"),
        ("sparseloco:chunk=32", "k must be an integer in"),  # the default k of 64 exceeds the chunk
        ("sparseloco:bits=1", "bits must be 2"),
        ("sparseloco:fraction=0.1", "takes 'chunk', 'k' and 'bits'"),
    ],
)
def test_bad_parameters_are_refused_naming_the_problem(option, problem):
    with pytest.raises(CodecError, match=problem):
        parse_codec(option)


def with_level(c: int, hi: float, lo: float, payload: bytes = PAYLOAD) -> bytes:
    return payload[: 8 * c] + struct.pack("<2f", hi, lo) + payload[8 * c + 8 :]


def with_streams(offsets: list[int], codes: list[int]) -> bytes:
    pack = lambda values: bytes([sum(v << (2 * j) for j, v in enumerate(values))])  # noqa: E731
    return PAYLOAD[:16] + pack(offsets) + pack(codes)


MALFORMED = [
    (with_level(0, math.nan, 3.0), "levels"),
    (with_level(1, math.inf, 0.25), "levels"),
    (with_level(0, 1.0, 3.0), "levels"),  # hi < lo
    (with_level(1, 1.0, -0.25), "levels"),
    (with_streams([3, 1, 0, 1], [3, 1, 2, 1]), "ascending"),
    (with_streams([1, 1, 0, 1], [3, 1, 2, 1]), "ascending"),
    (with_streams([1, 3, 0, 2], [3, 1, 2, 1]), "ascending"),  # offset 2 of a chunk of 2 values
    (with_streams([1, 3, 0, 1], [1, 1, 2, 1]), "high"),  # chunk 0 has no high value
    (with_streams([1, 3, 0, 1], [3, 3, 2, 1]), "high"),  # and here two
    (PAYLOAD[:-1], "must be"),
    (PAYLOAD + b"\0", "must be"),
    (encode(SMALL, VALUES + [1.0, 2.0, 3.0]), "must be"),  # three chunks' payload for two
]


@pytest.mark.parametrize(("payload", "problem"), MALFORMED)
def test_decoders_refuse_what_the_encoder_never_writes(payload, problem):
    with pytest.raises(CodecError, match=problem):
        decode(SMALL, payload, 6)
    with pytest.raises(CodecError, match=problem):
        decode_numpy(SMALL, payload, 6)


def test_decoders_refuse_set_padding_bits_and_unequal_levels_where_nothing_is_high():
    # five values: chunk 1 sends its one value, so its levels are equal and 3 offsets leave 2 padding bits
    valid = encode(SMALL, VALUES[:5])
    assert len(valid) == 16 + 1 + 1 and decode(SMALL, valid, 5)[4] == 1.0
    for bad, problem in ((valid[:16] + bytes([valid[16] | 0x80]) + valid[17:], "padding"),
                         (valid[:17] + bytes([valid[17] | 0x40]), "padding"),
                         (with_level(1, 1.0, 0.5, valid), "levels")):
        for decoder in (decode, decode_numpy):
            with pytest.raises(CodecError, match=problem):
                decoder(SMALL, bad, 5)


@pytest.mark.parametrize("spec", SPECS, ids=format_codec)
@settings(max_examples=40, deadline=None)
@given(values=value_lists)
def test_torch_and_reference_encoders_agree_and_numpy_decodes_the_same_values(spec, values):
    payload = encode(spec, values)
    assert encode_torch(spec, torch.tensor(values, dtype=torch.float32)) == payload
    assert len(payload) <= max_wire_size(spec, len(values))
    np.testing.assert_array_equal(decode_numpy(spec, payload, len(values)),
                                  np.array(decode(spec, payload, len(values)), dtype=np.float32))


@pytest.mark.parametrize("n", [4095, 4096, 4097, 20_000])
def test_torch_and_reference_agree_on_full_chunks_with_ties_and_zeros(n):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    values[rng.integers(0, n, n // 4)] = 0.0
    values[rng.integers(0, n, 200)] = np.float32(3e-3) * rng.choice([-1, 1], 200)  # 200 values tied in magnitude
    spec = parse_codec("sparseloco")
    payload = encode_torch(spec, torch.from_numpy(values))
    assert payload == encode(spec, array("f", values.tobytes()))
    decoded = decode_numpy(spec, payload, n)
    assert np.count_nonzero(decoded) == min(64, n - 4096 * (n // 4096)) * (n % 4096 > 0) + 64 * (n // 4096)
    assert (np.sign(decoded[decoded != 0]) == np.sign(values[decoded != 0])).all()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_numpy_and_reference_decoders_accept_and_reject_the_same_payloads(data):
    spec = data.draw(st.sampled_from(SPECS[:5]), label="spec")
    n = data.draw(st.integers(0, 12), label="n")
    payload = bytearray(data.draw(st.binary(min_size=encoded_size(spec, n), max_size=encoded_size(spec, n))))
    layout = sparseloco_layout(spec, n)
    for c in range(layout.chunks):  # random bytes are rarely valid levels: make some valid, so the streams get read
        if data.draw(st.booleans(), label="valid levels"):
            payload[8 * c : 8 * c + 8] = struct.pack("<2f", 2.0, 1.0 if layout.kept(c) > 1 else 2.0)
    try:
        expected = np.array(decode(spec, bytes(payload), n), dtype=np.float32)
    except CodecError:
        with pytest.raises(CodecError):
            decode_numpy(spec, bytes(payload), n)
    else:
        np.testing.assert_array_equal(decode_numpy(spec, bytes(payload), n), expected)


@settings(max_examples=20, deadline=None)
@given(rounds=st.lists(st.lists(any_float32 | tie_prone, min_size=11, max_size=11), min_size=1, max_size=4))
def test_torch_error_feedback_sends_the_same_bytes_and_keeps_the_same_residual_as_the_reference(rounds):
    spec = CodecSpec("sparseloco", {"chunk": 4, "k": 1, "bits": 2})
    reference, trainer = ErrorFeedback(11), TorchErrorFeedback(11)
    for values in rounds:
        assert trainer.encode(spec, torch.tensor(values)) == reference.encode(spec, values)
        assert trainer.residual.numpy().tobytes() == reference.residual.tobytes()


def test_error_feedback_sends_everything_in_the_end():
    # Each round's input is a fixed direction plus noise; the codec sends 1 value in 16 at 2 bits, so most of a
    # round stays behind, but what stays is sent in later rounds: the residual stays bounded while the sum grows.
    spec = CodecSpec("sparseloco", {"chunk": 16, "k": 1, "bits": 2})
    n, rounds = 64, 200
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(n).astype(np.float32)
    feedback = ErrorFeedback(n)
    inputs, sent = np.zeros(n), np.zeros(n)
    gaps = []
    for r in range(1, rounds + 1):
        values = direction + rng.standard_normal(n).astype(np.float32)
        inputs += values
        sent += decode(spec, feedback.encode(spec, array("f", values.tobytes())), n)
        np.testing.assert_allclose(sent + feedback.residual, inputs, atol=1e-3)  # nothing is lost
        gaps.append(np.linalg.norm(inputs - sent) / np.linalg.norm(inputs))
    assert gaps[0] > 0.75  # the first round sends little of its input (0.88 here)
    assert gaps[-1] < 0.06 and gaps[-1] < gaps[99] < gaps[9] < gaps[0]  # 0.031 after 200 rounds


def test_a_swarm_trains_with_sparseloco():
    # 4 workers, spot checks on (sparseloco updates are recorded, not judged): the loss falls, every update is
    # accepted, and each sends exactly the codec's bytes for the tiny model. What the codec leaves out waits in the
    # error feedback, so three short rounds fall slowly: 5.54 to 5.09 with the default outer momentum 0.5
    options = SimOptions(workers=4, rounds=3, inner_steps=4, batch=8, lr=3e-3, codec="sparseloco",
                         corpus_bytes=1_000_000, verify_share=0.5, out=None)
    result = run_simulation(options)
    assert result.summary["final_val_loss"] < 0.95 * result.summary["initial_val_loss"]
    assert result.summary["accepted"] == 4 * 3 and result.summary["rejected"] == 0
    assert result.summary["bytes_per_update"] == encoded_size(parse_codec("sparseloco"),
                                                               num_parameters(MODEL_SIZES["tiny"]))
