"""The Device interface on the browser's navigator.gpu, reached from Pyodide through its `js` and `pyodide.ffi`.

Mirrors device_wgpu.py call for call. Never import `js` or `pyodide` at module level: this module must import
(and be checked) under plain CPython, where neither exists.

Use:  device = BrowserDevice(adapter, gpu_device) with the GPUAdapter and GPUDevice the page opened (the page
owns the device, so that it can explain a missing adapter before loading Python), or `await BrowserDevice.create()`;
then trainer = DeviceTrainer(device, cfg, params). It cannot run natively; e2e/ exercises it in Chromium (the
page's node trains with it, and e2e/test_browser_gradient.py checks its gradients against torch).
"""

from __future__ import annotations

from typing import Any, Sequence

from kernels.device import Device, DeviceError, Dispatch


def _js_object(value: Any) -> Any:
    """A Python dict/list tree as plain JS objects/arrays (WebGPU descriptors must be objects, not Maps)."""
    from js import Object
    from pyodide.ffi import to_js

    return to_js(value, dict_converter=Object.fromEntries)


class BrowserDevice(Device):
    """A GPUDevice from navigator.gpu. Every method but `create` and `read_buffer` returns without awaiting."""

    def __init__(self, adapter: Any, gpu_device: Any):
        from js import GPUBufferUsage

        self.adapter = adapter
        self.device = gpu_device
        self.name = "navigator.gpu"
        self._usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST
        self._modules: dict[str, Any] = {}

    @classmethod
    async def create(cls, power_preference: str = "high-performance") -> "BrowserDevice":
        """Request an adapter and a device with the adapter's largest storage-buffer limits."""
        from js import navigator

        if not getattr(navigator, "gpu", None):
            raise DeviceError("navigator.gpu is missing: WebGPU needs a secure context (https or 127.0.0.1)")
        adapter = await navigator.gpu.requestAdapter(_js_object({"powerPreference": power_preference}))
        if not adapter:
            raise DeviceError("navigator.gpu.requestAdapter() returned null: this browser exposes no WebGPU adapter")
        limits = adapter.limits
        gpu_device = await adapter.requestDevice(
            _js_object(
                {
                    "requiredLimits": {
                        "maxStorageBufferBindingSize": limits.maxStorageBufferBindingSize,
                        "maxBufferSize": limits.maxBufferSize,
                    }
                }
            )
        )
        return cls(adapter, gpu_device)

    def create_buffer(self, size_bytes: int, label: str = "") -> Any:
        if size_bytes <= 0 or size_bytes % 4:
            raise ValueError(f"buffer size must be a positive multiple of 4 bytes, got {size_bytes}")
        return self.device.createBuffer(_js_object({"size": size_bytes, "usage": self._usage, "label": label}))

    def write_buffer(self, buffer: Any, data, offset_bytes: int = 0) -> None:
        from pyodide.ffi import to_js

        self.device.queue.writeBuffer(buffer, offset_bytes, to_js(memoryview(data).cast("B")))

    async def read_buffer(self, buffer: Any, size_bytes: int, offset_bytes: int = 0) -> bytes:
        from js import GPUBufferUsage, GPUMapMode, Uint8Array

        if size_bytes % 4 or offset_bytes % 4:
            raise ValueError("WebGPU copies whole 4-byte words: size and offset must be multiples of 4")
        staging = self.device.createBuffer(
            _js_object({"size": size_bytes, "usage": GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST})
        )
        encoder = self.device.createCommandEncoder()
        encoder.copyBufferToBuffer(buffer, offset_bytes, staging, 0, size_bytes)
        self.device.queue.submit(_js_object([encoder.finish()]))
        await staging.mapAsync(GPUMapMode.READ)
        try:
            return Uint8Array.new(staging.getMappedRange()).to_bytes()
        finally:
            staging.unmap()
            staging.destroy()

    def create_kernel(self, wgsl_source: str, entry_point: str) -> Any:
        module = self._modules.get(wgsl_source)
        if module is None:
            module = self._modules[wgsl_source] = self.device.createShaderModule(_js_object({"code": wgsl_source}))
        return self.device.createComputePipeline(
            _js_object({"layout": "auto", "compute": {"module": module, "entryPoint": entry_point}})
        )

    def create_binding(self, kernel: Any, buffers: dict[int, Any]) -> Any:
        entries = [{"binding": number, "resource": {"buffer": buffer}} for number, buffer in sorted(buffers.items())]
        return self.device.createBindGroup(_js_object({"layout": kernel.getBindGroupLayout(0), "entries": entries}))

    def submit(self, dispatches: Sequence[Dispatch]) -> None:
        encoder = self.device.createCommandEncoder()
        compute_pass = encoder.beginComputePass()
        for dispatch in dispatches:
            compute_pass.setPipeline(dispatch.kernel)
            compute_pass.setBindGroup(0, dispatch.binding)
            compute_pass.dispatchWorkgroups(*dispatch.workgroups)
        compute_pass.end()
        self.device.queue.submit(_js_object([encoder.finish()]))
