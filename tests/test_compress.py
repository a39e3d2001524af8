"""The wire format and rules of the reference codecs in shared/compress.py."""

import math
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import quant
from shared.compress import (
    CODECS,
    INT8_MIN_BLOCK_AMAX,
    CodecError,
    CodecSpec,
    ErrorFeedback,
    decode,
    encode,
    encoded_size,
)

FP32 = CodecSpec("fp32")
FP16 = CodecSpec("fp16")
INT8 = CodecSpec("int8", {"block": 4})
TOPK = CodecSpec("topk", {"k": 3})
EVERY_CODEC = [FP32, FP16, INT8, CodecSpec("int8"), TOPK, CodecSpec("topk", {"fraction": 0.25})]

finite_float32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_every_codec_is_listed():
    assert CODECS == ("fp32", "fp16", "int8", "topk")


@pytest.mark.parametrize(
    ("spec", "n", "size"),
    [
        (FP32, 1000, 4000),
        (FP16, 1000, 2000),
        (CodecSpec("int8"), 1000, 4 * 4 + 1000),  # blocks of 256: 4 scales
        (CodecSpec("int8", {"block": 1000}), 1000, 4 + 1000),
        (CodecSpec("int8"), 0, 0),
        (CodecSpec("topk", {"fraction": 0.01}), 1000, 4 + 8 * 10),
        (CodecSpec("topk"), 1000, 4 + 8 * 20),  # the default fraction, 0.02
        (CodecSpec("topk", {"k": 5000}), 1000, 4 + 8 * 1000),
        (CodecSpec("topk", {"k": 5}), 0, 4),
    ],
)
def test_encoded_size_is_exact(spec, n, size):
    assert encoded_size(spec, n) == size
    assert len(encode(spec, [0.5] * n)) == size


@pytest.mark.parametrize(
    ("fraction", "n", "k"), [(0.1, 30, 3), (0.29, 100, 29), (0.5, 5, 3), (1e-9, 100, 1), (1, 7, 7)]
)
def test_topk_fraction_rounds_half_up_and_keeps_at_least_one(fraction, n, k):
    assert encoded_size(CodecSpec("topk", {"fraction": fraction}), n) == 4 + 8 * k


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec("zstd"),
        CodecSpec("fp32", {"block": 4}),
        CodecSpec("int8", {"block": 0}),
        CodecSpec("int8", {"block": True}),
        CodecSpec("int8", {"block": 2**21}),
        CodecSpec("int8", {"blocks": 4}),
        CodecSpec("topk", {"k": 0}),
        CodecSpec("topk", {"k": 2, "fraction": 0.5}),
        CodecSpec("topk", {"fraction": 0.0}),
        CodecSpec("topk", {"fraction": 1.5}),
    ],
)
def test_unknown_codecs_and_bad_params_are_rejected(spec):
    with pytest.raises(CodecError):
        encoded_size(spec, 10)


def test_codec_spec_round_trips_through_a_dict():
    spec = CodecSpec("int8", {"block": 64})
    assert CodecSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("spec", EVERY_CODEC)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_encoders_reject_non_finite_values(spec, bad):
    with pytest.raises(CodecError, match="value 2 is"):
        encode(spec, [1.0, 2.0, bad, 4.0])


@pytest.mark.parametrize("spec", EVERY_CODEC)
@pytest.mark.parametrize("change", [-1, 1])
def test_decoders_reject_a_payload_of_the_wrong_length(spec, change):
    data = encode(spec, [1.0, -2.0, 3.0, 0.5, 7.0])
    with pytest.raises(CodecError, match="must be"):
        decode(spec, data[:change] if change < 0 else data + b"\0", 5)


def test_fp32_is_little_endian_float32():
    assert encode(FP32, [1.0, -2.0]) == bytes.fromhex("0000803f 000000c0")


@settings(max_examples=50)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_fp32_round_trips_exactly(values):
    assert list(decode(FP32, encode(FP32, values), len(values))) == values


def test_fp16_is_little_endian_half_precision():
    assert encode(FP16, [1.0, -2.0]) == bytes.fromhex("003c 00c0")


def test_fp16_rounds_to_nearest_with_ties_to_even():
    one_ulp = 2.0**-10
    values = [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 1 + 0.6 * one_ulp]
    assert list(decode(FP16, encode(FP16, values), 3)) == [1.0, 1 + 2 * one_ulp, 1 + one_ulp]


def test_fp16_rejects_values_beyond_half_precision_and_keeps_the_largest():
    assert list(decode(FP16, encode(FP16, [65519.0]), 1)) == [65504.0]
    with pytest.raises(CodecError, match="half precision"):
        encode(FP16, [65520.0])


@settings(max_examples=50)
@given(st.lists(finite_float32))
def test_fp16_error_is_at_most_half_a_half_precision_ulp(values):
    for x, y in zip(values, decode(FP16, encode(FP16, values), len(values))):
        ulp = 2.0 ** (math.floor(math.log2(abs(x))) - 10) if abs(x) >= 2.0**-14 else 2.0**-24
        assert abs(x - y) <= ulp / 2


def test_int8_wire_holds_all_scales_then_all_levels():
    # Block of 4 with max 127: scale 1, and halves round away from zero.
    values = [127.0, 63.5, -2.5, 0.49, 0.0, 0.0, 0.0, 0.0, -1.0]
    data = encode(INT8, values)
    scales = struct.unpack("<3f", data[:12])
    assert scales == (1.0, 0.0, f32(1 / 127))
    assert list(array("b", data[12:])) == [127, 64, -3, 0, 0, 0, 0, 0, -127]


def test_int8_sends_a_block_below_the_minimum_magnitude_as_zeros():
    data = encode(INT8, [2.0**-101, -(2.0**-101), 0.0, 1e-45, 2.0**-100])
    assert data == struct.pack("<2f", 0.0, f32(2.0**-100 / 127)) + array("b", [0, 0, 0, 0, 127]).tobytes()


def test_int8_rounds_the_exact_quotient_not_the_quotient_by_the_rounded_scale():
    # x = float32(0.25 / 127) lies just below half a level: 127 x / 0.5 = 0.4999999981, so q = 0, although
    # x divided by the float32-rounded scale rounds to 0.5 and would give 1.
    x = f32(0.25 / 127)
    assert f32(x / f32(0.5 / 127)) == 0.5
    data = encode(INT8, [0.5, x, -x, 0.0])
    assert list(array("b", data[4:])) == [127, 0, 0, 0]


def test_int8_minimum_block_magnitude_is_the_kernels_one():
    assert INT8_MIN_BLOCK_AMAX == quant.MIN_BLOCK_AMAX


@settings(max_examples=40)
@given(st.lists(st.one_of(finite_float32, st.sampled_from([0.0, 2.5, -2.5, 0.5, 1e-31, 2.0**-101])), max_size=600))
def test_int8_equals_the_kernels_rule_byte_for_byte(values):
    scales, codes = quant.quantize_int8(values)
    assert encode(CodecSpec("int8", {"block": quant.QUANT_BLOCK_SIZE}), values) == scales.tobytes() + codes


def test_int8_decodes_levels_times_scale():
    data = struct.pack("<2f", 0.5, 2.0) + array("b", [3, -127, 1]).tobytes()
    assert list(decode(CodecSpec("int8", {"block": 2}), data, 3)) == [1.5, -63.5, 2.0]


@settings(max_examples=50)
@given(st.lists(finite_float32, max_size=40), st.integers(1, 9))
def test_int8_error_is_at_most_half_a_scale(values, block):
    spec = CodecSpec("int8", {"block": block})
    data = encode(spec, values)
    scales = array("f", data[: 4 * -(-len(values) // block)])
    for j, (x, y) in enumerate(zip(values, decode(spec, data, len(values)))):
        # Half a level, plus the float32 roundings of the quotient and of the product.
        assert abs(x - y) <= scales[j // block] * (0.5 + 2**-16) + 1e-30


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (struct.pack("<f", -1.0) + bytes(2), "scale"),
        (struct.pack("<f", math.nan) + bytes(2), "scale"),
        (struct.pack("<f", 1.0) + array("b", [0, -128]).tobytes(), "-128"),
    ],
)
def test_int8_rejects_what_the_encoder_never_writes(payload, problem):
    with pytest.raises(CodecError, match=problem):
        decode(CodecSpec("int8", {"block": 2}), payload, 2)


def test_topk_keeps_the_largest_magnitudes_ties_to_the_lower_index():
    data = encode(TOPK, [0.5, -3.0, 2.0, 1.0, -2.0, 0.0])
    assert data == struct.pack("<I3I3f", 3, 1, 2, 4, -3.0, 2.0, -2.0)
    assert list(decode(TOPK, data, 6)) == [0.0, -3.0, 2.0, 0.0, -2.0, 0.0]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (struct.pack("<I3I3f", 2, 1, 2, 4, 1.0, 1.0, 1.0), "says 2 values"),
        (struct.pack("<I3I3f", 3, 1, 4, 2, 1.0, 1.0, 1.0), "ascending"),
        (struct.pack("<I3I3f", 3, 1, 2, 2, 1.0, 1.0, 1.0), "ascending"),
        (struct.pack("<I3I3f", 3, 1, 2, 6, 1.0, 1.0, 1.0), "out of range"),
    ],
)
def test_topk_rejects_bad_counts_and_indices(payload, problem):
    with pytest.raises(CodecError, match=problem):
        decode(TOPK, payload, 6)


def test_error_feedback_sends_next_round_what_this_round_dropped():
    feedback = ErrorFeedback(4)
    first = decode(TOPK, feedback.encode(TOPK, [4.0, 3.0, 2.0, 1.0]), 4)
    assert list(first) == [4.0, 3.0, 2.0, 0.0]
    assert list(feedback.residual) == [0.0, 0.0, 0.0, 1.0]
    second = decode(TOPK, feedback.encode(TOPK, [0.0, 0.0, 0.0, 0.5]), 4)
    assert list(second) == [0.0, 0.0, 0.0, 1.5]


@settings(max_examples=30)
@given(st.lists(st.lists(finite_float32, min_size=6, max_size=6), min_size=1, max_size=4))
def test_error_feedback_loses_nothing_over_rounds(rounds):
    # What was sent plus what is still held equals everything that went in (up to float32 rounding).
    spec = CodecSpec("int8", {"block": 4})
    feedback = ErrorFeedback(6)
    sent = [0.0] * 6
    for values in rounds:
        sent = [s + y for s, y in zip(sent, decode(spec, feedback.encode(spec, values), 6))]
    total = [math.fsum(r[j] for r in rounds) for j in range(6)]
    scale = 1 + max(abs(x) for r in rounds for x in r)
    for j in range(6):
        assert sent[j] + feedback.residual[j] == pytest.approx(total[j], abs=1e-5 * scale * len(rounds))
