"""The small WebGPU surface that the GPT kernels need: buffers, compute kernels, bindings, submission, readback.

Two implementations: device_wgpu (native, wgpu-py) and device_browser (navigator.gpu through Pyodide).
Never import a GPU binding here; this module must import under plain CPython and under Pyodide.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

# A single dispatch may use at most this many workgroups along one axis (the WebGPU default limit).
MAX_WORKGROUPS_PER_DIMENSION = 65_535


class DeviceError(RuntimeError):
    """The GPU could not be reached or refused an operation; the message says which and what to check."""


@dataclass(frozen=True)
class Dispatch:
    """One compute dispatch: a kernel, the buffers bound to it, and the workgroup grid (x, y, z)."""

    kernel: Any
    binding: Any
    workgroups: tuple[int, int, int]


class Device(ABC):
    """Every buffer is a storage buffer that can be copied to and from (STORAGE | COPY_SRC | COPY_DST).

    Work is ordered as submitted: writes, submissions and reads on the one queue happen in call order, and
    within one submission each dispatch sees the writes of the dispatches before it.
    """

    name: str = "device"

    @abstractmethod
    def create_buffer(self, size_bytes: int, label: str = "") -> Any:
        """A zero-filled buffer of `size_bytes` (a positive multiple of 4)."""

    @abstractmethod
    def write_buffer(self, buffer: Any, data, offset_bytes: int = 0) -> None:
        """Queue a copy of `data` (bytes-like, length a multiple of 4) into `buffer` at `offset_bytes`."""

    @abstractmethod
    async def read_buffer(self, buffer: Any, size_bytes: int, offset_bytes: int = 0) -> bytes:
        """Wait for all submitted work, then return `size_bytes` of `buffer` from `offset_bytes`."""

    @abstractmethod
    def create_kernel(self, wgsl_source: str, entry_point: str) -> Any:
        """A compute pipeline for `entry_point` of `wgsl_source`, its bind group layout derived from the shader."""

    @abstractmethod
    def create_binding(self, kernel: Any, buffers: dict[int, Any]) -> Any:
        """A bind group (group 0) giving each binding number in `buffers` the whole of that buffer."""

    @abstractmethod
    def submit(self, dispatches: Sequence[Dispatch]) -> None:
        """Record `dispatches` in order into one compute pass and submit it; returns without waiting."""


def grid_for(workgroups: int) -> tuple[int, int, int]:
    """A 2-D grid holding at least `workgroups` workgroups; kernels flatten it as y * groups.x + x."""
    if workgroups <= MAX_WORKGROUPS_PER_DIMENSION:
        return (max(workgroups, 1), 1, 1)
    rows = -(-workgroups // MAX_WORKGROUPS_PER_DIMENSION)
    return (MAX_WORKGROUPS_PER_DIMENSION, rows, 1)
