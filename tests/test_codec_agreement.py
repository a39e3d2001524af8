"""One int8 pseudo-gradient, three encoders: the trainer's torch, the browser's WGSL kernel, and shared/'s
reference. They must put the same bytes on the wire, and the coordinator's numpy decoder must read them back;
with the job's deflate stage too: a raw DEFLATE stream that plain zlib inflates to those bytes, and the decoder reads
any encoder's valid stream (the page deflates its WGSL bytes with Pyodide's zlib, through shared.compress.pack)."""

from __future__ import annotations

import asyncio
import zlib
from array import array

import numpy as np
import pytest
import torch

from kernels.int8_codec import DeviceInt8Codec
from server.codecs import decode_numpy, encode_torch
from shared import compress

SPEC = compress.CodecSpec("int8", {"block": 256})
DEFLATED = compress.CodecSpec("int8", {"block": 256, "deflate": True})


def pseudo_gradient(n: int, seed: int) -> np.ndarray:
    """global - local after some training: mostly small values, a few large ones, a zero block."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    g[rng.integers(0, n, 20)] *= 300
    g[512:768] = 0.0
    return g


@pytest.mark.parametrize("n", [1000, 4096, 10_007])
def test_torch_wgsl_and_reference_int8_encoders_agree_byte_for_byte(device, n):
    values = pseudo_gradient(n, seed=n)
    from_torch = encode_torch(SPEC, torch.from_numpy(values))
    from_reference = compress.encode(SPEC, array("f", values.tobytes()))
    codec = DeviceInt8Codec(device, n)
    scales, codes = asyncio.run(codec.encode(array("f", values.tobytes())))
    from_wgsl = scales.tobytes() + codes  # the wire layout: every block's float32 scale, then the codes
    assert len(from_torch) == compress.encoded_size(SPEC, n)
    assert from_torch == from_reference == from_wgsl

    decoded = decode_numpy(SPEC, from_wgsl, n)
    block_scales = np.repeat(np.frombuffer(scales.tobytes(), "<f4"), 256)[:n]
    assert np.all(np.abs(decoded - values) <= block_scales / 2 + 1e-12)
    assert np.all(decoded[512:768] == 0)

    # the deflate stage, checked against plain zlib rather than against shared.compress itself: the trainer's
    # wire is a raw DEFLATE stream (RFC 1951) of exactly the bytes all three encoders agree on, and smaller
    wire = encode_torch(DEFLATED, torch.from_numpy(values))
    assert zlib.decompress(wire, -15) == from_wgsl
    assert len(wire) < len(from_wgsl)
    np.testing.assert_array_equal(decode_numpy(DEFLATED, wire, n), decoded)
    # the page deflates with Pyodide's zlib, which need not emit these exact bytes: the coordinator reads any valid
    # stream of the same payload, stored blocks (zlib's worst case for size) included
    for level, strategy in ((9, zlib.Z_DEFAULT_STRATEGY), (6, zlib.Z_FILTERED), (0, zlib.Z_DEFAULT_STRATEGY)):
        other = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
        stream = other.compress(from_wgsl) + other.flush()
        np.testing.assert_array_equal(decode_numpy(DEFLATED, stream, n), decoded)
