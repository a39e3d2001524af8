"""The Device interface on native WebGPU through wgpu-py: kernel tests and benchmarks on lavapipe or a real GPU.

The only module of kernels/ that may import wgpu; never import it at module level, so that `import kernels`
and this module itself work where wgpu is not installed (Pyodide, `python -S`).
"""

from __future__ import annotations

from typing import Any, Sequence

from kernels.device import Device, DeviceError, Dispatch


class WgpuDevice(Device):
    """A wgpu-py device. Reads block (wgpu-py maps synchronously) inside the async `read_buffer`."""

    def __init__(self, power_preference: str = "high-performance"):
        try:
            import wgpu
        except ImportError as exc:
            raise DeviceError("wgpu-py is not installed: pip install 'wgpu>=0.32' (the dev extra)") from exc
        self._wgpu = wgpu
        no_adapter = (
            "wgpu found no adapter. Install a Vulkan driver (Debian: apt-get install mesa-vulkan-drivers gives "
            "lavapipe), or check WGPU_BACKEND_TYPE / WGPUPY_WGPU_ADAPTER_NAME if you set them."
        )
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        except Exception as exc:  # wgpu raises ValueError or RuntimeError depending on what is missing
            raise DeviceError(f"{no_adapter} ({type(exc).__name__}: {exc})") from exc
        if adapter is None:
            raise DeviceError(no_adapter)
        self.adapter = adapter
        self.name = f"{adapter.info.get('device', '?')} ({adapter.info.get('backend_type', '?')})"
        limits = adapter.limits
        self.device = adapter.request_device_sync(
            required_limits={
                "max-storage-buffer-binding-size": limits["max-storage-buffer-binding-size"],
                "max-buffer-size": limits["max-buffer-size"],
            }
        )
        self._usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        self._modules: dict[str, Any] = {}

    def create_buffer(self, size_bytes: int, label: str = "") -> Any:
        if size_bytes <= 0 or size_bytes % 4:
            raise ValueError(f"buffer size must be a positive multiple of 4 bytes, got {size_bytes}")
        return self.device.create_buffer(size=size_bytes, usage=self._usage, label=label)

    def write_buffer(self, buffer: Any, data, offset_bytes: int = 0) -> None:
        self.device.queue.write_buffer(buffer, offset_bytes, memoryview(data).cast("B"))

    async def read_buffer(self, buffer: Any, size_bytes: int, offset_bytes: int = 0) -> bytes:
        return bytes(self.device.queue.read_buffer(buffer, offset_bytes, size_bytes))

    def create_kernel(self, wgsl_source: str, entry_point: str) -> Any:
        module = self._modules.get(wgsl_source)
        if module is None:
            module = self._modules[wgsl_source] = self.device.create_shader_module(code=wgsl_source)
        return self.device.create_compute_pipeline(
            layout="auto", compute={"module": module, "entry_point": entry_point}
        )

    def create_binding(self, kernel: Any, buffers: dict[int, Any]) -> Any:
        entries = [
            {"binding": number, "resource": {"buffer": buffer, "offset": 0, "size": buffer.size}}
            for number, buffer in sorted(buffers.items())
        ]
        return self.device.create_bind_group(layout=kernel.get_bind_group_layout(0), entries=entries)

    def submit(self, dispatches: Sequence[Dispatch]) -> None:
        encoder = self.device.create_command_encoder()
        compute_pass = encoder.begin_compute_pass()
        for dispatch in dispatches:
            compute_pass.set_pipeline(dispatch.kernel)
            compute_pass.set_bind_group(0, dispatch.binding)
            compute_pass.dispatch_workgroups(*dispatch.workgroups)
        compute_pass.end()
        self.device.queue.submit([encoder.finish()])
