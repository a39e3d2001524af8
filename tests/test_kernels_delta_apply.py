"""kernels/apply_delta.wgsl applies a round's delta to the model bit for bit as shared.compress.apply_delta does (and
server.codecs.apply_delta with numpy): every node hashes the result against the signed model hash.

Natively, on wgpu-py (lavapipe in CI). Beyond real encoder output, the payloads are built bit by bit to reach the
cases float rounding gets wrong: products and sums that tie at half an ulp, subnormals (which a GPU may flush),
-0.0, exact cancellation, and addends far apart in exponent.
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from browser.browser_node import BrowserPort
from kernels.delta_apply import DeviceDeltaApply
from server.codecs import apply_delta as numpy_apply_delta
from server.codecs import encode_torch
from shared import compress
from shared.node import DELTA_STDLIB_MAX_BYTES

INT8_RAW = compress.CodecSpec("int8", {"block": 256})
FP32 = compress.CodecSpec("fp32")


@pytest.fixture(scope="module")
def applier(device):
    return DeviceDeltaApply(device)


def apply_on_device(applier: DeviceDeltaApply, model: bytes, spec: compress.CodecSpec, data: bytes) -> bytes | None:
    return asyncio.run(applier.apply(model, spec, data))


def assert_same_bytes(got: bytes | None, model: bytes, spec: compress.CodecSpec, data: bytes) -> None:
    want = compress.apply_delta(model, spec, data)
    assert got is not None
    first_bad = next((i for i in range(0, len(want), 4) if got[i : i + 4] != want[i : i + 4]), None)
    assert first_bad is None, (f"value {first_bad // 4}: model {model[first_bad:first_bad + 4].hex()} -> device "
                               f"{got[first_bad:first_bad + 4].hex()}, stdlib {want[first_bad:first_bad + 4].hex()}")
    params = np.frombuffer(model, "<f4")
    assert numpy_apply_delta(params, spec, data).tobytes() == want


def finite_bits(rng: np.random.Generator, n: int, max_exponent_field: int = 250) -> np.ndarray:
    """Random float32 bit patterns over the whole finite range: every sign, exponent field 0 (zeros and
    subnormals) up to `max_exponent_field`, any mantissa."""
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exponent = rng.integers(0, max_exponent_field + 1, n, dtype=np.uint32) << 23
    mantissa = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    return sign | exponent | mantissa


def model_like(rng: np.random.Generator, n: int) -> bytes:
    return (rng.standard_normal(n) * 0.02).astype(np.float32).tobytes()


@pytest.mark.parametrize("codec", ["int8", "int8:deflate=false", "int8:block=100", "int8:block=1,deflate=false"])
@pytest.mark.parametrize("n", [1, 255, 1000, 20_011])
def test_encoded_int8_deltas_apply_byte_for_byte(applier, codec, n):
    rng = np.random.default_rng(n)
    spec = compress.parse_codec(codec)
    delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    delta[rng.integers(0, n, 5)] *= 300
    delta[256:512] = 0.0  # a zero block (scale 0)
    data = compress.encode(spec, array("f", delta.tobytes()))
    model = model_like(rng, n)
    assert_same_bytes(apply_on_device(applier, model, spec, data), model, spec, data)


def test_int8_products_that_tie_and_scales_of_every_magnitude(applier):
    """q * scale for any finite scale the decoder accepts: subnormal, -0.0, huge; q = +-3 with an odd significand
    is a 25-bit product that ties at half an ulp, so rounding to even decides it."""
    n, block = 40_000, 4
    rng = np.random.default_rng(1)
    blocks = n // block
    scales = finite_bits(rng, blocks, max_exponent_field=240) & 0x7FFFFFFF  # decoders refuse negative scales...
    scales[::7] = 0x80000000  # ...but not -0.0
    scales[1::7] = rng.integers(1, 1 << 23, len(scales[1::7]))  # subnormal scales
    scales[2::7] |= 1  # odd significands: q = +-3 ties
    q = rng.integers(-127, 128, n).astype(np.int8)
    q[::3] = rng.choice(np.array([-3, 3], np.int8), len(q[::3]))
    spec = compress.CodecSpec("int8", {"block": block})
    data = scales.astype("<u4").tobytes() + q.tobytes()
    model = model_like(rng, n)
    assert_same_bytes(apply_on_device(applier, model, spec, data), model, spec, data)


def test_sums_of_arbitrary_finite_floats(applier):
    """fp32 deltas reach the add alone: random bit patterns on both sides, subnormals and zeros included."""
    rng = np.random.default_rng(2)
    n = 60_000
    model = finite_bits(rng, n)
    delta = finite_bits(rng, n)
    near = rng.integers(0, n, n // 3)  # addends close in exponent, where cancellation and carries happen
    delta[near] = (delta[near] & 0x807FFFFF) | (model[near] & 0x7F800000) + (rng.integers(0, 3, len(near)) << 23)
    tiny = rng.integers(0, n, n // 10)  # both subnormal or nearly so: what a flushing GPU gets wrong
    model[tiny] &= 0x80FFFFFF
    delta[tiny] &= 0x80FFFFFF
    data, model_bytes = delta.astype("<u4").tobytes(), model.astype("<u4").tobytes()
    assert_same_bytes(apply_on_device(applier, model_bytes, FP32, data), model_bytes, FP32, data)


def f32_bits(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def test_ties_zeros_and_cancellation_follow_ieee(applier):
    ulp = 2.0**-23
    model = f32_bits(1.0, 1.0 + ulp, 1.0, -0.0, -0.0, 0.0, 2.5, 1.0, 1e-45, 1e-38, 3.0e38, 1.0, 2.0**-126, -1.0)
    delta = f32_bits(ulp / 2, ulp / 2, -ulp / 4, -0.0, 0.0, -0.0, -2.5, 2.0**-60, -1e-45, -1.1e-38, 1e31,
                     3 * ulp / 2, -(2.0**-127), -(ulp / 4) * 3)
    assert_same_bytes(apply_on_device(applier, model, FP32, delta), model, FP32, delta)


@pytest.mark.parametrize("model, delta", [
    (f32_bits(1.0, float("inf")), f32_bits(1.0, 1.0)),
    (f32_bits(1.0, 2.0), f32_bits(float("nan"), 1.0)),
    (f32_bits(3.0e38, 1.0), f32_bits(3.0e38, 1.0)),  # the sum overflows float32
])
def test_values_that_are_not_finite_are_left_to_the_cpu(applier, model, delta):
    assert apply_on_device(applier, model, FP32, delta) is None


@pytest.mark.parametrize("payload, message", [
    (f32_bits(1.0) + bytes([0x80, 1, 2]), "-128"),
    (f32_bits(-1.0) + bytes([1, 2, 3]), "scale"),
    (f32_bits(float("inf")) + bytes([1, 2, 3]), "scale"),
    (f32_bits(1.0) + bytes([1, 2]), "bytes"),
])
def test_payloads_the_stdlib_refuses_are_refused(applier, payload, message):
    model = f32_bits(1.0, 2.0, 3.0)
    with pytest.raises(compress.CodecError, match=message):
        compress.apply_delta(model, INT8_RAW, payload)
    with pytest.raises(compress.CodecError, match=message):
        apply_on_device(applier, model, INT8_RAW, payload)


def test_a_page_applies_a_delta_beyond_the_stdlib_limit_on_its_gpu(device):
    """BrowserPort takes the delta of a model too large for the stdlib path and applies it with the kernel."""
    n = DELTA_STDLIB_MAX_BYTES // 4 + 1000
    rng = np.random.default_rng(3)
    params = (rng.standard_normal(n) * 0.02).astype(np.float32)
    spec = compress.parse_codec("int8")
    data = encode_torch(spec, torch.from_numpy((rng.standard_normal(n) * 1e-3).astype(np.float32)))
    port = BrowserPort(SimpleNamespace(report=lambda text: None), device)
    model = params.tobytes()
    assert port.applies_delta(model)
    new, new_bytes = port.apply_delta(model, spec, data)
    assert new == new_bytes == numpy_apply_delta(params, spec, data).tobytes()
    # a codec the GPU does not do: declined above the limit (the node fetches the snapshot), applied below it
    topk = compress.parse_codec("topk:k=3")
    assert port.apply_delta(model, topk, struct.pack("<I3I3f", 3, 0, 1, 2, 0.5, 0.0, -1.0)) is None
    small = f32_bits(1.0, 2.0, 3.0)
    assert port.apply_delta(small, topk, compress.encode(topk, [0.5, 0.0, -1.0])) == (f32_bits(1.5, 2.0, 2.0),) * 2
