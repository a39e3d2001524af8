"""kernels/apply_delta.wgsl in a real browser: Chromium's WebGPU (Tint, SwiftShader) from Pyodide, waited for from
synchronous Python with run_sync, as BrowserPort.apply_delta does; the bytes must equal shared.compress.apply_delta's.

Uses tests/test_kernels_browser.py's page and loopback-only Chromium; without them it fails, naming what to install.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures

import numpy as np

from shared import compress
from tests import test_kernels_browser as browser_kernels

site = browser_kernels.site  # the page, Pyodide and kernels/ + shared/ on a loopback server

CASES = ("int8", "int8:block=4,deflate=false", "fp32")

IN_BROWSER = """
import base64, json
from pyodide.ffi import can_run_sync, run_sync
from pyodide.http import pyfetch
from kernels.delta_apply import DeviceDeltaApply
from kernels.device_browser import BrowserDevice
from shared import compress

applier = DeviceDeltaApply(await BrowserDevice.create())
model = await (await pyfetch("/model.bin")).bytes()

def apply_now(spec, data):  # synchronous, as NodePort.apply_delta is
    return run_sync(applier.apply(model, spec, data))

results = {}
for i, codec in enumerate(CASES):
    data = await (await pyfetch(f"/delta{i}.bin")).bytes()
    results[codec] = base64.b64encode(apply_now(compress.parse_codec(codec), data)).decode()
json.dumps({"can_run_sync": can_run_sync(), "results": results})
"""


def deltas(n: int) -> list[bytes]:
    """An encoder's int8 delta, an int8 payload of ties and odd scales built by hand, and fp32 of any finite bits."""
    rng = np.random.default_rng(5)
    encoded = compress.encode(compress.parse_codec(CASES[0]), (rng.standard_normal(n) * 1e-3).astype(np.float32))
    scales = (rng.integers(1, 0x60000000, n // 4, dtype=np.uint32) | 1).astype("<u4")
    scales[::5] = rng.integers(1, 1 << 23, len(scales[::5]))  # subnormal scales
    levels = rng.choice(np.array([-3, 3, 127, -127, 0, 1], np.int8), n)  # +-3 times an odd significand ties
    bits = (rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32) & 0xFEFFFFFF).astype("<u4")  # finite
    return [encoded, scales.tobytes() + levels.tobytes(), bits.tobytes()]


def test_the_delta_kernel_applies_byte_for_byte_in_chromium(site):
    root, base_url = site
    n = 4096
    rng = np.random.default_rng(6)
    model = (rng.standard_normal(n) * 0.02).astype(np.float32)
    model[:64] = rng.integers(1, 1 << 23, 64).astype(np.uint32).view(np.float32)  # subnormals, which a GPU may flush
    (root / "model.bin").write_bytes(model.tobytes())
    payloads = deltas(n)
    for i, payload in enumerate(payloads):
        (root / f"delta{i}.bin").write_bytes(payload)
    code = f"CASES = {CASES!r}\n" + IN_BROWSER

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # own loop: Playwright's sync API may hold this one
        result = pool.submit(asyncio.run, browser_kernels.run_in_chromium(base_url, code)).result()

    assert result["can_run_sync"] is True  # JSPI: BrowserPort can wait for the GPU inside apply_delta
    for codec, payload in zip(CASES, payloads):
        expected = compress.apply_delta(model.tobytes(), compress.parse_codec(codec), payload)
        assert base64.b64decode(result["results"][codec]) == expected, codec
