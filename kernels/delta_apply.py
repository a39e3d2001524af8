"""A round's published delta applied to the float32 model on the GPU (kernels/apply_delta.wgsl), for fp32 and int8.

Never let the result drift from shared.compress.apply_delta by one bit: every node hashes it against the signed
model hash. The payload is checked and inflated on the CPU exactly as shared.compress decodes it; only the
dequantise-and-add, the per-value work, runs on the device.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from kernels.device import Device, Dispatch, grid_for
from kernels.shaders import KernelCache
from shared.compress import INT8_LEVELS, CodecError, CodecSpec, int8_block, unpack

DEVICE_DELTA_CODECS = ("fp32", "int8")
"""The codecs whose deltas the device applies; the others stay on shared.compress's standard-library path."""

WORKGROUP = 256  # apply_delta.wgsl's: one value per invocation


def _check_int8_payload(raw: bytes, blocks: int) -> None:
    """Raise CodecError where shared.compress's int8 decoder would: a scale not finite or negative, a level of
    -128. Both checks run in C (sum, min, bytes.find), not value by value."""
    scales = array("f", raw[: 4 * blocks])
    if scales and not (math.isfinite(sum(scales)) and min(scales) >= 0):
        for b, scale in enumerate(scales):
            if not (math.isfinite(scale) and scale >= 0):
                raise CodecError(f"int8 block {b} has scale {scale}; scales are finite and >= 0")
    j = raw.find(b"\x80", 4 * blocks)
    if j >= 0:
        raise CodecError(f"int8 value {j - 4 * blocks} is -128; levels run from -{INT8_LEVELS} to {INT8_LEVELS}")


class DeviceDeltaApply:
    """Applies encoded deltas to float32 models on `device`; keeps its buffers for the next model of the same size."""

    def __init__(self, device: Device, kernels: KernelCache | None = None):
        self.device = device
        kernels = kernels or KernelCache(device)
        self._kernels = {"int8": kernels.get("apply_delta.wgsl", "apply_int8_delta"),
                         "fp32": kernels.get("apply_delta.wgsl", "apply_fp32_delta")}
        self._buffers: tuple[int, int, Any, Any, Any, Any] | None = None  # (count, payload bytes, buffers...)

    def _buffers_for(self, count: int, payload_bytes: int) -> tuple[Any, Any, Any, Any]:
        if self._buffers is None or self._buffers[:2] != (count, payload_bytes):
            device = self.device
            self._buffers = (count, payload_bytes, device.create_buffer(4 * count, "delta params"),
                             device.create_buffer(payload_bytes, "delta payload"),
                             device.create_buffer(4, "delta not finite"), device.create_buffer(16, "delta dims"))
        return self._buffers[2:]

    async def apply(self, model: bytes, spec: CodecSpec, data: bytes) -> bytes | None:
        """`model` (little-endian float32 bytes) plus the decoded delta `data` under `spec`: the bytes
        shared.compress.apply_delta makes. None when a value of the model, the delta or the sum is not finite
        (the caller then applies it on the CPU). Raises CodecError as shared.compress.decode does, and ValueError
        for a codec outside DEVICE_DELTA_CODECS or a model that is not whole float32 values."""
        if spec.name not in DEVICE_DELTA_CODECS:
            raise ValueError(f"the device applies {', '.join(DEVICE_DELTA_CODECS)} deltas, not {spec.name!r}")
        if len(model) % 4:
            raise ValueError(f"a float32 model is a multiple of 4 bytes, got {len(model)}")
        count = len(model) // 4
        raw = unpack(spec, data, count)  # checks the size, inflates, refuses a deflate bomb
        blocks = block = 0
        if spec.name == "int8":
            block = int8_block(spec)
            blocks = -(-count // block)
            _check_int8_payload(raw, blocks)
        if count == 0:
            return b""
        padding = -len(raw) % 4
        params, payload, not_finite, dims = self._buffers_for(count, len(raw) + padding)
        device = self.device
        device.write_buffer(params, model)
        device.write_buffer(payload, raw + bytes(padding) if padding else raw)
        device.write_buffer(not_finite, bytes(4))
        device.write_buffer(dims, array("I", [count, max(block, 1), blocks, 0]))
        kernel = self._kernels[spec.name]
        binding = device.create_binding(kernel, {0: params, 1: payload, 2: not_finite, 3: dims})
        device.submit([Dispatch(kernel, binding, grid_for(-(-count // WORKGROUP)))])
        if await device.read_buffer(not_finite, 4) != bytes(4):
            return None
        return await device.read_buffer(params, 4 * count)
