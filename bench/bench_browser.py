"""How fast the browser node trains: the WGSL trainer in Chromium (Pyodide + WebGPU) against torch on this CPU.

Prints tokens/s of AdamW training steps for `tiny` and `small` in both, and the matmul kernel's GFLOP/s in
Chromium beside torch's, with ratios. Never use it as a correctness check (e2e/ and tests/ do that); it
starts a throwaway coordinator on 127.0.0.1 only to serve the page.

Run from the repository root:  python -m bench.bench_browser [--models tiny,small] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from e2e.chromium import WEBGPU_FLAGS, BrowserProcess
from server.model import GPT, init_parameters
from shared.model import MODEL_SIZES

ROOT = Path(__file__).resolve().parent.parent
# batch sizes per model: tiny as in the e2e job's scale-up, small kept to a few seconds per step on SwiftShader
BATCH_SIZES = {"tiny": 8, "small": 4}
MATMUL_SIZES = (256, 512, 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_coordinator(data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A coordinator on 127.0.0.1 (extra: more `python -m server` options) and its URL, once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(data_dir),
                             "--log-level", "WARNING", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/api/status", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the coordinator did not start within 60 s")


def torch_train_speed(model_name: str, batch_size: int, steps: int) -> float:
    """tokens/s of torch AdamW steps on the CPU (the PyTorch trainer's step), after one warm-up step."""
    cfg = MODEL_SIZES[model_name]
    model = GPT(cfg)
    init_parameters(model, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (batch_size, cfg.block_size), generator=generator),
                torch.randint(0, 256, (batch_size, cfg.block_size), generator=generator)) for _ in range(steps + 1)]

    def step(tokens, targets) -> None:
        _, loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(*batches[0])
    best = float("inf")
    for _ in range(3):  # best of three: this machine is shared, and a busy neighbour only ever slows us down
        started = time.perf_counter()
        for tokens, targets in batches[1:]:
            step(tokens, targets)
        best = min(best, time.perf_counter() - started)
    return steps * batch_size * cfg.block_size / best


def torch_matmul_gflops(n: int) -> float:
    """torch's x @ W.T on the CPU: best of five timings, each of enough products to last about 50 ms."""
    x, w = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # wakes the thread pool
        x @ w.T
    started = time.perf_counter()
    x @ w.T
    repeats = max(1, int(0.05 / max(time.perf_counter() - started, 1e-6)))
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            x @ w.T
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated model sizes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model (default: %(default)s)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    from playwright.sync_api import sync_playwright

    # torch first, with no browser alive: SwiftShader's worker threads would take this CPU from torch
    torch_matmul = {n: torch_matmul_gflops(n) for n in MATMUL_SIZES}
    torch_train = {name: torch_train_speed(name, BATCH_SIZES.get(name, 4), max(args.steps, 5)) for name in models}

    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp:
        coordinator, url = start_coordinator(Path(tmp) / "data")
        try:
            with sync_playwright() as p:
                browser = BrowserProcess(p, WEBGPU_FLAGS, Path(tmp))
                try:
                    page = browser.page()
                    page.goto(url + "/")
                    page.wait_for_function("() => window.swarmgrad !== undefined")
                    started = time.perf_counter()
                    page.evaluate("() => swarmgrad.matmulSpeed(32, 1)")  # loads Pyodide and the bundle
                    print(f"Chromium {browser.browser.version}, WebGPU adapter: "
                          f"{page.evaluate('() => swarmgrad.state.adapter')}; Pyodide + bundle loaded in "
                          f"{time.perf_counter() - started:.1f} s; torch {torch.__version__} on "
                          f"{torch.get_num_threads()} CPU threads", flush=True)
                    for n in MATMUL_SIZES:
                        r = page.evaluate(f"() => swarmgrad.matmulSpeed({n}, {3 if n <= 512 else 1})")
                        baseline = torch_matmul[n]
                        print(f"matmul {n}^3 (x @ W.T): WGSL in Chromium {r['gflops']:6.2f} GFLOP/s, torch CPU "
                              f"{baseline:7.2f} GFLOP/s, ratio {r['gflops'] / baseline:.4f}", flush=True)
                    for name in models:
                        batch = BATCH_SIZES.get(name, 4)
                        cfg = MODEL_SIZES[name]
                        r = page.evaluate(f"() => swarmgrad.trainSpeed({json.dumps(name)}, {batch}, {args.steps})")
                        baseline = torch_train[name]
                        print(f"train {name} ({r['params']:,} params, B={batch}, T={cfg.block_size}): WGSL in Chromium "
                              f"{r['tokens_per_s']:8.0f} tokens/s ({r['seconds_per_step'] * 1e3:.0f} ms/step), "
                              f"torch CPU {baseline:8.0f} tokens/s, ratio {r['tokens_per_s'] / baseline:.4f}",
                              flush=True)
                finally:
                    browser.close()
        finally:
            coordinator.terminate()
            coordinator.wait(10)


if __name__ == "__main__":
    main()
