"""server/codecs.py's torch encoders and numpy decoders agree with shared/compress.py byte for byte."""

import math
import struct
from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.codecs import TorchErrorFeedback, decode_numpy, encode_torch
from shared.compress import CodecError, CodecSpec, ErrorFeedback, decode, encode, encoded_size

SPECS = [
    CodecSpec("fp32"),
    CodecSpec("fp16"),
    CodecSpec("int8"),
    CodecSpec("int8", {"block": 1}),
    CodecSpec("int8", {"block": 5}),
    CodecSpec("topk", {"k": 1}),
    CodecSpec("topk", {"k": 4}),
    CodecSpec("topk", {"fraction": 0.3}),
    CodecSpec("int8", {"block": 5, "deflate": True}),
    CodecSpec("topk", {"k": 4, "deflate": True}),
    CodecSpec("fp32", {"deflate": True}),
    CodecSpec("sparseloco", {"chunk": 8, "k": 3, "bits": 2}),
]

# Wide magnitudes reach fp16's subnormals and int8's tiny scales; repeats and zeros make ties.
any_float32 = st.floats(-6e4, 6e4, allow_nan=False, width=32)
tie_prone = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.5, 127.0, 1e-40])
value_lists = st.lists(st.one_of(any_float32, tie_prone), max_size=40)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.params}")
@settings(max_examples=60, deadline=None)
@given(values=value_lists)
def test_torch_encode_equals_reference_encode_byte_for_byte(spec, values):
    assert encode_torch(spec, torch.tensor(values, dtype=torch.float32)) == encode(spec, values)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.params}")
@settings(max_examples=60, deadline=None)
@given(values=value_lists)
def test_numpy_decode_equals_reference_decode(spec, values):
    data = encode(spec, values)
    expected = np.array(decode(spec, data, len(values)), dtype=np.float32)
    np.testing.assert_array_equal(decode_numpy(spec, data, len(values)), expected)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.params}")
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_numpy_and_reference_decoders_accept_and_reject_the_same_payloads(spec, data):
    # Arbitrary bytes of the right length: both decoders must raise CodecError, or both give the same values.
    n = data.draw(st.integers(0, 12), label="n")
    payload = data.draw(st.binary(min_size=encoded_size(spec, n), max_size=encoded_size(spec, n)), label="payload")
    if spec.name == "topk" and n:
        # Random counts are almost never k; make them right so the index checks get exercised.
        payload = struct.pack("<I", (encoded_size(spec, n) - 4) // 8) + payload[4:]
    try:
        expected = np.array(decode(spec, payload, n), dtype=np.float32)
    except CodecError:
        with pytest.raises(CodecError):
            decode_numpy(spec, payload, n)
    else:
        np.testing.assert_array_equal(decode_numpy(spec, payload, n), expected)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.params}")
def test_numpy_decoder_rejects_truncated_and_padded_payloads(spec):
    data = encode(spec, [1.0, -2.0, 3.0, 0.25, 9.0, -7.0])
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match="must be|must inflate|not a valid deflate stream"):
            decode_numpy(spec, bad, 6)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (struct.pack("<I2I2f", 1, 1, 2, 1.0, 1.0), "says 1 values"),
        (struct.pack("<I2I2f", 2, 3, 1, 1.0, 1.0), "ascending"),
        (struct.pack("<I2I2f", 2, 3, 3, 1.0, 1.0), "ascending"),
        (struct.pack("<I2I2f", 2, 1, 2**32 - 1, 1.0, 1.0), "below 6"),
    ],
)
def test_numpy_topk_decoder_rejects_bad_counts_and_indices(payload, problem):
    with pytest.raises(CodecError, match=problem):
        decode_numpy(CodecSpec("topk", {"k": 2}), payload, 6)


def test_numpy_int8_decoder_rejects_level_minus_128():
    payload = struct.pack("<f", 1.0) + array("b", [5, -128]).tobytes()
    with pytest.raises(CodecError, match="-128"):
        decode_numpy(CodecSpec("int8"), payload, 2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=300), st.integers(1, 64))
def test_int8_round_trip_error_is_at_most_half_a_scale(values, block):
    spec = CodecSpec("int8", {"block": block})
    x = np.array(values, dtype=np.float32)
    decoded = decode_numpy(spec, encode_torch(spec, torch.from_numpy(x)), x.size)
    blocks = -(-x.size // block)
    scales = np.repeat(np.abs(np.pad(x, (0, blocks * block - x.size))).reshape(blocks, block).max(axis=1) / 127, block)
    assert (np.abs(decoded - x) <= scales[: x.size] * (0.5 + 2**-16) + 1e-30).all()


def test_fp16_round_trip_stays_within_half_precision():
    x = torch.linspace(-1000, 1000, 10_001)
    decoded = decode_numpy(CodecSpec("fp16"), encode_torch(CodecSpec("fp16"), x), x.numel())
    assert np.all(np.abs(decoded - x.numpy()) <= np.abs(x.numpy()) * 2.0**-11)


def test_torch_fp16_rejects_values_beyond_half_precision():
    with pytest.raises(CodecError, match="half precision"):
        encode_torch(CodecSpec("fp16"), torch.tensor([1.0, 65520.0]))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.params}")
def test_torch_encoders_reject_non_finite_values(spec):
    with pytest.raises(CodecError, match="value 1 is nan"):
        encode_torch(spec, torch.tensor([1.0, math.nan, 2.0]))


def test_torch_encoders_accept_finite_values_whose_sum_overflows():
    values = [3e38, 3e38, 3e38, -1.0]
    assert encode_torch(CodecSpec("fp32"), torch.tensor(values)) == encode(CodecSpec("fp32"), values)


@pytest.mark.parametrize("spec", [CodecSpec("int8", {"block": 3}), CodecSpec("topk", {"k": 2})])
@settings(max_examples=20, deadline=None)
@given(rounds=st.lists(st.lists(any_float32, min_size=7, max_size=7), min_size=1, max_size=4))
def test_torch_error_feedback_sends_the_same_bytes_as_the_reference(spec, rounds):
    reference, trainer = ErrorFeedback(7), TorchErrorFeedback(7)
    for values in rounds:
        assert trainer.encode(spec, torch.tensor(values)) == reference.encode(spec, values)
    assert trainer.residual.tolist() == list(reference.residual)
