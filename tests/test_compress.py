"""The wire format and rules of the reference codecs in shared/compress.py."""

import math
import struct
import zlib
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
    format_codec,
    max_wire_size,
    parse_codec,
)

FP32 = CodecSpec("fp32")
FP16 = CodecSpec("fp16")
INT8 = CodecSpec("int8", {"block": 4})
TOPK = CodecSpec("topk", {"k": 3})
EVERY_CODEC = [FP32, FP16, INT8, CodecSpec("int8"), TOPK, CodecSpec("topk", {"fraction": 0.25}),
               CodecSpec("int8", {"block": 4, "deflate": True}), CodecSpec("topk", {"k": 3, "deflate": True}),
               CodecSpec("sparseloco", {"chunk": 2, "k": 1, "bits": 2})]

finite_float32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_every_codec_is_listed():
    assert CODECS == ("fp32", "fp16", "int8", "topk", "sparseloco")


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
    with pytest.raises(CodecError, match="must be|must inflate|not a valid deflate stream"):
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


# -- the deflate stage ------------------------------------------------------------------------------------

DEFLATED = [CodecSpec(name, {**params, "deflate": True}) for name, params in
            [("fp32", {}), ("fp16", {}), ("int8", {"block": 4}), ("int8", {}), ("topk", {"k": 3})]]


@pytest.mark.parametrize("spec", DEFLATED, ids=format_codec)
@settings(max_examples=30)
@given(st.lists(finite_float32, max_size=300))
def test_deflate_is_lossless_the_decoded_values_are_the_codecs_own(spec, values):
    plain = CodecSpec(spec.name, {k: v for k, v in spec.params.items() if k != "deflate"})
    data = encode(spec, values)
    assert len(data) <= max_wire_size(spec, len(values))
    assert zlib.decompress(data, -15) == encode(plain, values)
    assert decode(spec, data, len(values)) == decode(plain, encode(plain, values), len(values))


def test_deflate_shrinks_int8_levels_of_a_heavy_tailed_vector():
    # most of a block sits far below its largest value, so small levels repeat: Huffman codes them short
    values = [(i % 17 - 8) * 0.01 + (1.0 if i % 256 == 0 else 0.0) for i in range(4096)]
    spec = CodecSpec("int8", {"deflate": True})
    assert len(encode(spec, values)) < 0.6 * encoded_size(spec, len(values))


def test_a_decoder_accepts_any_valid_deflate_stream():
    # another implementation may compress at another level and with another strategy; only the bytes count
    values = [0.5, -1.0, 0.25, 3.0, 0.0, 2.0]
    spec = CodecSpec("int8", {"block": 4, "deflate": True})
    raw = zlib.decompress(encode(spec, values), -15)
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)
    assert decode(spec, stream.compress(raw) + stream.flush(), 6) == decode(spec, encode(spec, values), 6)


def raw_deflate(data: bytes) -> bytes:
    stream = zlib.compressobj(6, zlib.DEFLATED, -15)
    return stream.compress(data) + stream.flush()


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (raw_deflate(bytes(4 * 9)), "inflate to exactly 24"),  # one value too many
        (raw_deflate(bytes(4 * 5)), "inflate to exactly 24"),  # one value too few
        (raw_deflate(bytes(24)) + b"\0", "inflate to exactly 24"),  # bytes after the stream
        (raw_deflate(bytes(24))[:-1], "inflate to exactly 24"),  # the stream cut short
        (b"\xff" * 10, "not a valid deflate stream"),
        (b"", "must be 1 to"),
        (raw_deflate(bytes(10**6)), "must be 1 to|inflate to exactly 24"),  # a bomb: a megabyte from ~1 KB
    ],
)
def test_deflated_payloads_must_inflate_to_exactly_the_codecs_size(payload, problem):
    with pytest.raises(CodecError, match=problem):
        decode(CodecSpec("fp32", {"deflate": True}), payload, 6)


def test_a_payload_longer_than_deflates_worst_case_is_refused_before_inflating():
    spec = CodecSpec("fp32", {"deflate": True})
    bound = max_wire_size(spec, 1000)
    assert 4000 < bound < 4100
    with pytest.raises(CodecError, match=f"must be 1 to {bound} bytes"):
        decode(spec, bytes(bound + 1), 1000)


def test_deflate_must_be_a_boolean():
    with pytest.raises(CodecError, match="deflate must be true or false"):
        encoded_size(CodecSpec("int8", {"deflate": 1}), 10)


# -- a job's codec option ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "spec"),
    [
        ("fp32", CodecSpec("fp32")),
        ("fp16", CodecSpec("fp16")),
        ("int8", CodecSpec("int8", {"block": 256, "deflate": True})),
        ("topk", CodecSpec("topk", {"fraction": 0.02, "deflate": True})),
        ("int8:block=64", CodecSpec("int8", {"block": 64, "deflate": True})),
        ("int8: block = 64 , deflate=false", CodecSpec("int8", {"block": 64, "deflate": False})),
        ("topk:fraction=0.01", CodecSpec("topk", {"fraction": 0.01, "deflate": True})),
        ("topk:k=100", CodecSpec("topk", {"k": 100, "deflate": True})),
        ("fp32:deflate=true", CodecSpec("fp32", {"deflate": True})),
    ],
)
def test_codec_options_start_from_the_job_defaults(option, spec):
    assert parse_codec(option) == spec
    assert parse_codec(format_codec(spec)) == spec


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("zstd", "unknown codec 'zstd'"),
        ("int8:block", "not key=value"),
        ("int8:=3", "not key=value"),
        ("int8:block=0", "block must be an integer"),
        ("int8:block=1.5", "block must be an integer"),
        ("int8:levels=4", "takes only 'block'"),
        ("int8:deflate=yes", "not true, false or a number"),
        ("int8:deflate=1", "deflate must be true or false"),
        ("topk:fraction=0", "fraction must be in"),
        ("topk:fraction=inf", "not finite"),
        ("fp16:block=4", "takes no params"),
    ],
)
def test_bad_codec_options_are_refused_naming_the_problem(option, problem):
    with pytest.raises(CodecError, match=problem):
        parse_codec(option)
