"""How fast the "Try the model" generator runs: WGSL with a key/value cache (kernels/generate.py) on native wgpu and
in Chromium, against torch's greedy generation on this CPU, for `tiny` and `small`.

Prints decode tokens/s (greedy, from the first new token to the last, so prompt and shader compilation are left
out) and the ratio to torch. The torch baseline is `python -m server sample`'s loop (server/sample.py, nanoGPT's: a
full forward over the context for each token, as the torch model has no cache); beside it, torch forwards of a
single token, about what a cached torch step would cost. Never a correctness check: tests/test_generate_wgsl.py
and e2e/test_generate.py are.
Chromium's side starts a throwaway coordinator on 127.0.0.1 per model and drives the page's box.

Run from the repository root:  python -m bench.bench_generate [--models tiny,small] [--no-chromium]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from array import array
from pathlib import Path

import torch

from bench.bench_browser import start_coordinator
from kernels.generate import DeviceGenerator
from server.model import GPT, flat_parameters, init_parameters
from shared.model import MODEL_SIZES, num_parameters
from server.sample import ONE_THREAD_MAX_FLOPS
from server.sample import generate as torch_generate

PROMPT = b"def main():\n    "  # 16 tokens
REPEATS = 3  # best of: this machine is shared, and a busy neighbour only ever slows us down


def new_tokens(name: str) -> int:
    """As many tokens as fit the context after the prompt, so that no run slides its window."""
    return MODEL_SIZES[name].block_size - len(PROMPT)


def torch_speed(model: GPT, count: int) -> float:
    """Decode tokens/s of torch_generate: the time of `count` tokens less that of one (the prompt's forward)."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        torch_generate(model, list(PROMPT), 1, temperature=0.0)
        first = time.perf_counter() - started
        started = time.perf_counter()
        torch_generate(model, list(PROMPT), count, temperature=0.0)
        best = min(best, time.perf_counter() - started - first)
    return (count - 1) / best


def torch_step_speed(model: GPT, count: int) -> float:
    """Tokens/s of torch forwards of one token alone: about what a cached torch decode step would cost, at least.
    On threads as server/sample.py chooses them (one for a forward this small)."""
    token = torch.tensor([[PROMPT[0]]])
    threads = torch.get_num_threads()
    if 2 * num_parameters(model.cfg) < ONE_THREAD_MAX_FLOPS:
        torch.set_num_threads(1)
    best = float("inf")
    try:
        with torch.no_grad():
            model(token)
            for _ in range(REPEATS):
                started = time.perf_counter()
                for _ in range(count):
                    model(token)
                best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return count / best


def native_speed(model: GPT, count: int) -> tuple[float, str]:
    """Decode tokens/s of DeviceGenerator on wgpu-py's default adapter, and the adapter's name."""
    from kernels.device_wgpu import WgpuDevice

    device = WgpuDevice()
    generator = DeviceGenerator(device, model.cfg, array("f", flat_parameters(model).numpy().tobytes()))

    async def timed() -> float:
        first = None
        async for _ in generator.generate(PROMPT, count):
            first = first or time.perf_counter()
        return time.perf_counter() - first

    asyncio.run(timed())  # warm-up: pipelines compile on first use
    return (count - 1) / min(asyncio.run(timed()) for _ in range(REPEATS)), device.name


def chromium_speed(name: str, count: int, playwright, tmp: Path) -> tuple[float, bool]:
    """Decode tokens/s of the page's box (its own timing) on a fresh coordinator of `name`, and whether its
    tokens equal torch's greedy tokens for the seed-0 model that coordinator starts from."""
    from e2e.chromium import WEBGPU_FLAGS, BrowserProcess

    coordinator, url = start_coordinator(tmp / f"data-{name}", "--model", name, "--seed", "0")
    try:
        browser = BrowserProcess(playwright, WEBGPU_FLAGS, tmp)
        try:
            page = browser.page()
            page.goto(url + "/")
            page.wait_for_function("() => window.swarmgradGenerate !== undefined")
            speeds, tokens = [], None
            for _ in range(1 + REPEATS):  # the first loads Pyodide and the model, and compiles the pipelines
                page.evaluate(f"() => swarmgradGenerate.generate({json.dumps(PROMPT.decode())}, {count}, 0)")
                page.wait_for_function("() => swarmgradGenerate.state.phase !== 'generating'", timeout=600_000)
                state = page.evaluate("() => swarmgradGenerate.state")
                if state["phase"] != "done":
                    raise RuntimeError(f"the box did not generate: {state['message']}")
                speeds.append(state["tokensPerSec"])
                tokens = state["tokens"]
        finally:
            browser.close()
    finally:
        coordinator.terminate()
        coordinator.wait(10)
    model = GPT(MODEL_SIZES[name])
    init_parameters(model, 0)
    return max(speeds[1:]), tokens == torch_generate(model, list(PROMPT), count, temperature=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated model sizes (default: %(default)s)")
    parser.add_argument("--no-chromium", action="store_true", help="skip the browser (native wgpu and torch only)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads; prompt {len(PROMPT)} tokens, greedy; "
          f"load average {os.getloadavg()[0]:.1f} (others' work on this machine slows every number)", flush=True)
    baselines = {}
    for name in models:
        model = GPT(MODEL_SIZES[name])
        init_parameters(model, 0)
        count = new_tokens(name)
        baselines[name] = torch_speed(model, count)
        one_token = torch_step_speed(model, count)
        native, adapter = native_speed(model, count)
        print(f"{name} ({sum(p.numel() for p in model.parameters()):,} params, {count} new tokens): torch CPU "
              f"{baselines[name]:7.1f} tokens/s (one-token forwards alone: {one_token:7.1f}); WGSL native "
              f"({adapter}) {native:7.1f} tokens/s, ratio {native / baselines[name]:.3f} "
              f"(to one-token forwards {native / one_token:.3f})", flush=True)
    if args.no_chromium:
        return
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp, sync_playwright() as p:
        for name in models:
            speed, agrees = chromium_speed(name, new_tokens(name), p, Path(tmp))
            print(f"{name}: WGSL in Chromium {speed:7.1f} tokens/s, ratio to torch CPU {speed / baselines[name]:.3f}; "
                  f"tokens {'equal' if agrees else 'DIFFER from'} torch greedy", flush=True)


if __name__ == "__main__":
    main()
