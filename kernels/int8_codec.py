"""The int8 blockwise codec (rule in kernels/quant.py) run on the GPU: quantise a - b without leaving the device.

Never let the GPU result drift from kernels/quant.py: the tests compare them byte for byte.
"""

from __future__ import annotations

from array import array
from typing import Any

from kernels.device import Device, Dispatch, grid_for
from kernels.quant import QUANT_BLOCK_SIZE
from kernels.shaders import KernelCache

QUANT_THREADS_PER_BLOCK = QUANT_BLOCK_SIZE // 4  # each invocation packs 4 codes into one u32


def _padded(num_bytes: int) -> int:
    return max(4, -(-num_bytes // 4) * 4)


class DeviceInt8Codec:
    """Quantises (minuend - subtrahend) of `count` float32 values held in device buffers."""

    def __init__(self, device: Device, count: int, kernels: KernelCache | None = None):
        self.device = device
        self.count = count
        self.num_blocks = -(-count // QUANT_BLOCK_SIZE)
        kernels = kernels or KernelCache(device)
        self.codes = device.create_buffer(_padded(count), "int8 codes")
        self.scales = device.create_buffer(4 * self.num_blocks, "int8 scales")
        self._dims = device.create_buffer(16, "quantize dims")
        device.write_buffer(self._dims, array("I", [count, 0, 0, 0]))
        self._quantize = kernels.get("quantize.wgsl", "quantize_int8_blocks")
        self._dequantize = kernels.get("quantize.wgsl", "dequantize_int8_blocks")
        self._last_binding: tuple[Any, Any, Any] | None = None

    def quantize(self, minuend: Any, subtrahend: Any) -> None:
        """Queue the quantisation of minuend - subtrahend into `self.codes` and `self.scales`."""
        cached = self._last_binding
        if cached is None or cached[0] is not minuend or cached[1] is not subtrahend:
            binding = self.device.create_binding(
                self._quantize, {0: minuend, 1: subtrahend, 2: self.codes, 3: self.scales, 5: self._dims}
            )
            # Holding the buffers themselves (not their ids) keeps a reused id from matching a dead buffer.
            cached = self._last_binding = (minuend, subtrahend, binding)
        self.device.submit([Dispatch(self._quantize, cached[2], grid_for(self.num_blocks))])

    def dequantize(self, values: Any) -> None:
        """Queue the decoding of `self.codes` and `self.scales` into the float32 buffer `values`."""
        binding = self.device.create_binding(
            self._dequantize, {2: self.codes, 3: self.scales, 4: values, 5: self._dims}
        )
        self.device.submit([Dispatch(self._dequantize, binding, grid_for(-(-self.count // 256)))])

    async def read(self) -> tuple[array, bytes]:
        """The last quantisation as (scales array('f'), codes bytes of length count)."""
        scales = array("f", await self.device.read_buffer(self.scales, 4 * self.num_blocks))
        codes = await self.device.read_buffer(self.codes, _padded(self.count))  # whole words, for WebGPU
        return scales, codes[: self.count]

    async def encode(self, values) -> tuple[array, bytes]:
        """Upload float32 `values`, quantise them on the device and return (scales, codes)."""
        if not isinstance(values, (bytes, bytearray, memoryview, array)):
            values = array("f", values)
        data = memoryview(values).cast("B")
        if len(data) != 4 * self.count:
            raise ValueError(f"expected {self.count} float32 values ({4 * self.count} bytes), got {len(data)} bytes")
        source = self.device.create_buffer(4 * self.count, "values to quantise")
        zeros = self.device.create_buffer(4 * self.count, "zeros")
        self.device.write_buffer(source, data)
        self.quantize(source, zeros)
        return await self.read()

    async def decode(self, scales, codes: bytes) -> array:
        """Upload (scales, codes), dequantise on the device and return the float32 values."""
        if len(codes) != self.count or len(scales) != self.num_blocks:
            raise ValueError(f"expected {self.count} codes and {self.num_blocks} scales")
        self.device.write_buffer(self.codes, bytes(codes) + bytes(_padded(self.count) - self.count))
        self.device.write_buffer(self.scales, array("f", scales))
        values = self.device.create_buffer(4 * self.count, "dequantized values")
        self.dequantize(values)
        return array("f", await self.device.read_buffer(values, 4 * self.count))
