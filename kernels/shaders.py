"""Loads the WGSL sources shipped beside this module and compiles each entry point once per device.

Never generate or patch shader text here: shapes reach the kernels through small dims buffers, so one
compiled pipeline serves every batch shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kernels.device import Device

SHADER_DIR = Path(__file__).resolve().parent

SHADER_FILES = (
    "adamw.wgsl",
    "apply_delta.wgsl",
    "attention.wgsl",
    "attention_decode.wgsl",
    "cross_entropy.wgsl",
    "embedding.wgsl",
    "gelu.wgsl",
    "layer_norm.wgsl",
    "matmul.wgsl",
    "pseudo_gradient.wgsl",
    "quantize.wgsl",
    "sparseloco.wgsl",
)


def shader_source(file_name: str) -> str:
    """The text of one WGSL file of this package (a plain file, also inside Pyodide's unpacked zip)."""
    if file_name not in SHADER_FILES:
        raise KeyError(f"unknown shader {file_name!r}; known: {', '.join(SHADER_FILES)}")
    return (SHADER_DIR / file_name).read_text(encoding="utf-8")


class KernelCache:
    """Compiled pipelines of one device, keyed by (file, entry point)."""

    def __init__(self, device: Device):
        self.device = device
        self._kernels: dict[tuple[str, str], Any] = {}

    def get(self, file_name: str, entry_point: str) -> Any:
        key = (file_name, entry_point)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self.device.create_kernel(shader_source(file_name), entry_point)
        return kernel
