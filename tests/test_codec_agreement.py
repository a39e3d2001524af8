"""One int8 pseudo-gradient, three encoders: the trainer's torch, the browser's WGSL kernel, and shared/'s
reference. They must put the same bytes on the wire, and the coordinator's numpy decoder must read them back;
with the job's deflate stage too (the page deflates its WGSL bytes with Pyodide's zlib, as shared.compress.pack)."""

from __future__ import annotations

import asyncio
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

    wire = compress.pack(DEFLATED, from_wgsl)
    assert encode_torch(DEFLATED, torch.from_numpy(values)) == compress.encode(DEFLATED, array("f", values.tobytes()))
    assert encode_torch(DEFLATED, torch.from_numpy(values)) == wire
    assert len(wire) < len(from_wgsl)
    np.testing.assert_array_equal(decode_numpy(DEFLATED, wire, n), decoded)
