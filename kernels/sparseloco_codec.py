"""The sparseloco codec (rule in shared/compress.py) run on the GPU, with its error-feedback residual kept there.

Never let the GPU bytes drift from shared.compress: the tests compare them byte for byte, payloads and residuals.
"""

from __future__ import annotations

from array import array
from typing import Any

from kernels.device import Device, Dispatch, grid_for
from kernels.shaders import KernelCache
from shared.compress import CodecError, CodecSpec, ErrorFeedback, pack, sparseloco_layout

WORKGROUP = 256  # kernels/sparseloco.wgsl's; a chunk (MAX_SPARSELOCO_CHUNK at most) is WORKGROUP x 16 values
NO_NON_FINITE = 0xFFFFFFFF  # the status word when every value was finite


class DeviceSparseLoCo:
    """Error feedback with the sparseloco codec on a device: each `encode_difference(minuend, subtrahend)` sends
    encode(minuend - subtrahend + residual) and keeps the rest as the residual, all in device buffers, as
    shared.compress.ErrorFeedback does on the CPU. One per node, model and codec spec."""

    def __init__(self, device: Device, spec: CodecSpec, count: int, kernels: KernelCache | None = None):
        self.layout = layout = sparseloco_layout(spec, count)
        self.device, self.spec, self.count = device, spec, count
        kernels = kernels or KernelCache(device)
        size = max(4, 4 * count)
        # Two residual buffers: a round reads one and writes the other, which becomes the residual only once the
        # round's values proved finite (a refused round leaves the residual as it was, as on the CPU).
        self._residuals = [device.create_buffer(size, "sparseloco residual"),
                           device.create_buffer(size, "sparseloco residual")]
        self._current = 0
        self._slots = device.create_buffer(max(4, 4 * layout.chunks * layout.k), "sparseloco slots")
        self._index_words = -(-layout.selected * layout.index_bits // 32)
        self._code_words = -(-layout.selected // 16)
        self._status_word = 2 * layout.chunks + self._index_words + self._code_words
        self._payload = device.create_buffer(4 * (self._status_word + 1), "sparseloco payload")
        self._status = device.create_buffer(4, "sparseloco status")
        self._dims = device.create_buffer(48, "sparseloco dims")
        device.write_buffer(self._dims, array("I", [
            count, layout.chunk, layout.k, layout.index_bits, layout.chunks, layout.selected,
            -(-layout.chunk // WORKGROUP), 2 * layout.chunks, self._index_words, self._code_words,
            self._status_word, 0]))
        self._select = kernels.get("sparseloco.wgsl", "sparseloco_select")
        self._pack = kernels.get("sparseloco.wgsl", "sparseloco_pack")
        self._pack_dispatch = Dispatch(
            self._pack,
            device.create_binding(self._pack, {4: self._slots, 5: self._payload, 7: self._dims, 8: self._status}),
            grid_for(-(-(self._index_words + self._code_words) // WORKGROUP)))
        self._bindings: list[tuple[Any, Any, int, Any]] = []  # (minuend, subtrahend, current residual, binding)
        self._values: Any = None  # encode()'s upload buffer and a zero subtrahend, made on first use
        self._zeros: Any = None

    @property
    def residual_buffer(self) -> Any:
        """The device buffer that holds the current residual (float32, count values)."""
        return self._residuals[self._current]

    async def encode_difference(self, minuend: Any, subtrahend: Any) -> bytes:
        """The wire payload (deflated when the spec asks) of minuend - subtrahend + residual, two float32 device
        buffers of `count` values; the residual becomes what it did not send. Raises CodecError when a value is
        not finite, leaving the residual as it was."""
        if self.count == 0:
            return pack(self.spec, b"")
        # Matched by identity: browser buffers are unhashable JS proxies. Holding the buffers themselves (not their
        # ids) keeps a reused id from matching a dead buffer.
        same = [entry for entry in self._bindings if entry[0] is minuend and entry[1] is subtrahend]
        binding = next((entry[3] for entry in same if entry[2] == self._current), None)
        if binding is None:
            binding = self.device.create_binding(self._select, {
                0: minuend, 1: subtrahend, 2: self._residuals[self._current], 3: self._residuals[1 - self._current],
                4: self._slots, 5: self._payload, 6: self._status, 7: self._dims})
            self._bindings = same + [(minuend, subtrahend, self._current, binding)]  # one per residual buffer
        self.device.write_buffer(self._status, array("I", [NO_NON_FINITE]))
        self.device.submit([Dispatch(self._select, binding, grid_for(self.layout.chunks)), self._pack_dispatch])
        words = await self.device.read_buffer(self._payload, 4 * (self._status_word + 1))
        first_bad = array("I", words[4 * self._status_word :])[0]
        if first_bad != NO_NON_FINITE:
            raise CodecError(f"value {first_bad} is not finite; only finite values can be encoded")
        self._current = 1 - self._current
        layout, offsets = self.layout, 8 * self.layout.chunks
        codes = offsets + 4 * self._index_words
        raw = (words[:offsets] + words[offsets : offsets + layout.index_bytes]
               + words[codes : codes + layout.code_bytes])
        return pack(self.spec, raw)

    async def encode(self, values) -> bytes:
        """Upload float32 `values` and encode them with error feedback (the first call: a plain encode)."""
        data = memoryview(values if isinstance(values, (bytes, bytearray, memoryview, array))
                          else array("f", values)).cast("B")
        if len(data) != 4 * self.count:
            raise ValueError(f"expected {self.count} float32 values ({4 * self.count} bytes), got {len(data)} bytes")
        if self._values is None:
            self._values = self.device.create_buffer(max(4, 4 * self.count), "values to encode")
            self._zeros = self.device.create_buffer(max(4, 4 * self.count), "zeros")
        if self.count:
            self.device.write_buffer(self._values, data)
        return await self.encode_difference(self._values, self._zeros)

    async def read_residual(self) -> array:
        """The residual, as array('f')."""
        if self.count == 0:
            return array("f")
        return array("f", await self.device.read_buffer(self.residual_buffer, 4 * self.count))

    def load_residual(self, feedback: ErrorFeedback) -> None:
        """Carry on from a CPU ErrorFeedback's residual (what an earlier codec of this node left out)."""
        if len(feedback.residual) != self.count:
            raise CodecError(f"error feedback holds {len(feedback.residual)} values, this codec {self.count}")
        if self.count:
            self.device.write_buffer(self.residual_buffer, feedback.residual)
