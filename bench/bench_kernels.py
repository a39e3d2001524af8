"""How fast the WGSL kernels run on the native adapter, each number beside torch CPU measured in the same run.

Prints the matmul kernels' GFLOP/s (512^3, 1024^3) and the tiny GPT's training tokens/s. Never use it as a
correctness check: tests/test_kernels_parity.py is that.

Run from the repository root:  python -m bench.bench_kernels [--batch 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from array import array

import torch

from kernels.device import Dispatch
from kernels.device_wgpu import WgpuDevice
from kernels.shaders import KernelCache
from kernels.trainer import DeviceTrainer
from server.model import GPT, flat_parameters, init_parameters
from shared.model import MODEL_SIZES

MATMUL_SIZES = (512, 1024)
MATMUL_FORMS = {  # entry point -> what it computes, all (n x n) @ (n x n)
    "linear_forward": "x @ W.T",
    "matmul_grad_input": "dY @ W",
    "matmul_grad_weight": "dY.T @ X",
}


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_matmul(device: WgpuDevice, kernels: KernelCache, n: int) -> None:
    a, b, out = (device.create_buffer(4 * n * n) for _ in range(3))
    values = array("f", (((i * 7919) % 1000) / 1000.0 for i in range(n * n)))
    device.write_buffer(a, values)
    device.write_buffer(b, values)
    dims = device.create_buffer(32)
    device.write_buffer(dims, array("I", [n, n, n, 0, 0, 0, 0, 0]))
    flops = 2 * n**3

    x, w = torch.randn(n, n), torch.randn(n, n)
    torch_seconds = best_of(5, lambda: x @ w.T)
    print(f"matmul {n}^3  torch CPU ({torch.get_num_threads()} threads): {flops / torch_seconds / 1e9:7.2f} GFLOP/s")
    for entry, form in MATMUL_FORMS.items():
        kernel = kernels.get("matmul.wgsl", entry)
        buffers = {0: a, 1: b, 3: out, 4: dims}
        if entry == "linear_forward":
            buffers[2] = device.create_buffer(16)
        groups = (n // 4 // 8, n // 4 // 8, 1)
        dispatch = Dispatch(kernel, device.create_binding(kernel, buffers), groups)
        repeats = 3 if n <= 512 else 1

        def run_and_wait() -> None:
            device.submit([dispatch] * repeats)
            asyncio.run(device.read_buffer(out, 4))

        if n == MATMUL_SIZES[0]:
            run_and_wait()  # the driver compiles the shader on first use
        seconds = best_of(2, run_and_wait) / repeats
        gflops = flops / seconds / 1e9
        print(f"matmul {n}^3  WGSL {entry:19s} ({form:9s}): {gflops:7.2f} GFLOP/s = "
              f"{gflops / (flops / torch_seconds / 1e9):.3f} x torch")


def bench_training(device: WgpuDevice, batch: int, steps: int) -> None:
    cfg = MODEL_SIZES["tiny"]
    seq = cfg.block_size
    model = GPT(cfg)
    init_parameters(model, 0)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 256, (batch, seq), generator=generator), torch.randint(0, 256, (batch, seq), generator=generator))
        for _ in range(steps)
    ]
    trainer = DeviceTrainer(device, cfg, array("f", flat_parameters(model).numpy().tobytes()), max_batch_size=batch)
    byte_batches = [(t.to(torch.uint8).numpy().tobytes(), y.to(torch.uint8).numpy().tobytes()) for t, y in batches]
    asyncio.run(trainer.train_steps(byte_batches[:1], lr=1e-3))  # builds pipelines and the plan
    start = time.perf_counter()
    asyncio.run(trainer.train_steps(byte_batches, lr=1e-3))
    wgsl_seconds = (time.perf_counter() - start) / steps

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def torch_step(tokens, targets) -> None:
        optimizer.zero_grad()
        _, loss = model(tokens, targets)
        loss.backward()
        optimizer.step()

    torch_step(*batches[0])
    start = time.perf_counter()
    for tokens, targets in batches:
        torch_step(tokens, targets)
    torch_seconds = (time.perf_counter() - start) / steps
    tokens_per_step = batch * seq
    wgsl_rate, torch_rate = tokens_per_step / wgsl_seconds, tokens_per_step / torch_seconds
    print(f"train step tiny B={batch} T={seq}: WGSL {wgsl_seconds * 1e3:7.1f} ms = {wgsl_rate:8.0f} tokens/s; "
          f"torch CPU {torch_seconds * 1e3:7.1f} ms = {torch_rate:8.0f} tokens/s; ratio {wgsl_rate / torch_rate:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step (tiny, T=64)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    args = parser.parse_args()
    device = WgpuDevice()
    print(f"adapter: {device.name}")
    kernels = KernelCache(device)
    for n in MATMUL_SIZES:
        bench_matmul(device, kernels, n)
    bench_training(device, args.batch, args.steps)


if __name__ == "__main__":
    main()
