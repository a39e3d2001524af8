"""Measurements the page offers to tests and benchmarks: one batch's gradient, training speed, matmul speed.

They run the same kernels/ driver as the node, on the page's GPUDevice. Never use them in the round logic.
"""

from __future__ import annotations

import json
import random
import time
from array import array
from typing import Any

from kernels.device import Dispatch
from kernels.device_browser import BrowserDevice
from kernels.shaders import KernelCache
from kernels.trainer import DeviceTrainer
from shared.model import GPTConfig, model_config, num_parameters

from browser_node import ADAMW_BETAS, ADAMW_EPS, js_bytes

MATMUL_WORKGROUP = 8  # matmul.wgsl: 8x8 invocations, each 4x4 outputs


def _config(model: str) -> GPTConfig:
    """A named size ("tiny") or a JSON object of GPTConfig fields."""
    return GPTConfig.from_dict(json.loads(model)) if model.lstrip().startswith("{") else model_config(model)


async def gradient_for_batch(adapter: Any, gpu_device: Any, model: str, params: Any, tokens: Any, targets: Any,
                             seq_len: int) -> dict:
    """Loss and flat gradient (float32 bytes, layout order) of one batch at `params` on the page's GPU."""
    cfg = _config(model)
    params_bytes, token_bytes, target_bytes = js_bytes(params), js_bytes(tokens), js_bytes(targets)
    if len(params_bytes) != 4 * num_parameters(cfg):
        raise ValueError(f"{model} has {num_parameters(cfg)} parameters; got {len(params_bytes)} bytes")
    device = BrowserDevice(adapter, gpu_device)
    trainer = DeviceTrainer(device, cfg, params_bytes, max_batch_size=len(token_bytes) // seq_len)
    loss, grads = await trainer.loss_and_grads(token_bytes, target_bytes, seq_len)
    return {"loss": loss, "grads": grads.tobytes()}


async def train_speed(adapter: Any, gpu_device: Any, model: str, batch_size: int, steps: int) -> dict:
    """Seconds per AdamW step of the WGSL trainer on random bytes, after one warm-up step (pipelines, plan)."""
    cfg = _config(model)
    rng = random.Random(0)
    block = array("f", [rng.gauss(0.0, 0.02) for _ in range(4096)])  # tiled: speed does not depend on values
    params = (block * (num_parameters(cfg) // len(block) + 1))[: num_parameters(cfg)]
    rows = batch_size * cfg.block_size
    batches = [(rng.randbytes(rows), rng.randbytes(rows)) for _ in range(steps + 1)]
    trainer = DeviceTrainer(BrowserDevice(adapter, gpu_device), cfg, params, max_batch_size=batch_size)
    await trainer.train_steps(batches[:1], 1e-3, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    started = time.perf_counter()
    losses = await trainer.train_steps(batches[1:], 1e-3, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    seconds = (time.perf_counter() - started) / steps
    return {"seconds_per_step": seconds, "tokens_per_s": rows / seconds, "losses": losses,
            "params": num_parameters(cfg)}


async def matmul_speed(adapter: Any, gpu_device: Any, n: int, repeats: int = 3) -> dict:
    """GFLOP/s of matmul.wgsl's linear_forward (x @ W.T) for n x n x n, best of three timed submissions."""
    if n % 32:
        raise ValueError("n must be a multiple of 32 (one workgroup computes a 32x32 tile)")
    device = BrowserDevice(adapter, gpu_device)
    kernels = KernelCache(device)
    a, b, out = (device.create_buffer(4 * n * n, name) for name in ("x", "W", "y"))
    values = array("f", [((i * 7919) % 1000) / 1000.0 for i in range(n * n)])
    device.write_buffer(a, values)
    device.write_buffer(b, values)
    dims = device.create_buffer(32, "dims")
    device.write_buffer(dims, array("I", [n, n, n, 0, 0, 0, 0, 0]))
    kernel = kernels.get("matmul.wgsl", "linear_forward")
    binding = device.create_binding(kernel, {0: a, 1: b, 2: device.create_buffer(16, "no residual"), 3: out, 4: dims})
    dispatch = Dispatch(kernel, binding, (n // 4 // MATMUL_WORKGROUP, n // 4 // MATMUL_WORKGROUP, 1))
    device.submit([dispatch])
    await device.read_buffer(out, 4)  # compiles the pipeline in the driver
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        device.submit([dispatch] * repeats)
        await device.read_buffer(out, 4)
        best = min(best, (time.perf_counter() - started) / repeats)
    return {"n": n, "seconds": best, "gflops": 2 * n**3 / best / 1e9}
