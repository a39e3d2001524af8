"""kernels/device_browser.py drives the same WGSL GPT in a real browser: Chromium's WebGPU, from Pyodide.

Headless Debian Chromium (SwiftShader WebGPU) loads Pyodide from node_modules, unpacks kernels/ and shared/ from
a zip, and runs DeviceTrainer on BrowserDevice; the results must match torch, computed here in CPython: the loss,
every gradient, and the parameters after one AdamW step (torch.optim.AdamW from the same start parameters and
hyperparameters). Without Chromium, Playwright or the npm Pyodide the test fails, naming what installs the missing
piece; every request off 127.0.0.1 is aborted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import base64
import functools
import http.server
import json
import shutil
import tempfile
import threading
import zipfile
from array import array
from pathlib import Path

import pytest
import torch

from kernels import quant
from shared import compress
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from shared.model import GPTConfig, parameter_layout

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
PYODIDE_DIR = REPO / "node_modules" / "pyodide"
# one AdamW step's hyperparameters, given explicitly to both the browser and torch.optim.AdamW
HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
SPARSELOCO = "sparseloco:chunk=1024,k=32"  # encoded twice in Chromium's WGSL, the second time with the residual
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-webgpu",
]
PAGE = """<!doctype html><html><head><meta charset="utf-8"><script src="pyodide/pyodide.js"></script></head><body>
<script>
window.boot = async function () {
  window.pyodide = await loadPyodide({ indexURL: "/pyodide/" });
  const zip = await (await fetch("/packages.zip")).arrayBuffer();
  pyodide.unpackArchive(zip, "zip", { extractDir: pyodide.runPython("import sysconfig; sysconfig.get_path('purelib')") });
};
</script></body></html>"""

# Runs inside Pyodide: the browser engineer's calls, in the order they will make them.
IN_BROWSER = """
import base64, json
from pyodide.http import pyfetch
from kernels.device_browser import BrowserDevice
from kernels.trainer import DeviceTrainer
from shared.model import GPTConfig

cfg = GPTConfig.from_dict(json.loads(CONFIG))
params = await (await pyfetch("/params.bin")).bytes()
tokens = await (await pyfetch("/tokens.bin")).bytes()
targets = await (await pyfetch("/targets.bin")).bytes()
device = await BrowserDevice.create()
trainer = DeviceTrainer(device, cfg, params, max_batch_size=BATCH)
loss, grads = await trainer.loss_and_grads(tokens, targets, seq_len=SEQ)
losses = await trainer.train_steps([(tokens, targets)], seq_len=SEQ, **HYPER)
local = await trainer.read_params()
scales, codes = await trainer.pseudo_gradient_int8()
from kernels.sparseloco_codec import DeviceSparseLoCo
from shared import compress
sparse = DeviceSparseLoCo(device, compress.parse_codec(SPARSELOCO), trainer.num_params, trainer.kernels)
sparse_payloads = [await sparse.encode_difference(trainer.global_params, trainer.params) for _ in range(2)]
json.dumps({
    "sparseloco": [base64.b64encode(p).decode() for p in sparse_payloads],
    "loss": loss,
    "losses": losses,
    "grads": base64.b64encode(grads.tobytes()).decode(),
    "local": base64.b64encode(local.tobytes()).decode(),
    "scales": base64.b64encode(scales.tobytes()).decode(),
    "codes": base64.b64encode(codes).decode(),
})
"""


def browser_missing() -> str | None:
    """What is missing for this test, with the command that installs it (`./dev setup` installs all three)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed: run `apt-get install chromium` (or `./dev setup`)"
    if not (PYODIDE_DIR / "pyodide.js").exists():
        return f"npm Pyodide is not installed at {PYODIDE_DIR}: run `npm ci` in {REPO} (or `./dev setup`)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed: run `.venv/bin/pip install -e '.[dev]'` (or `./dev setup`)"
    return None


@pytest.fixture
def site():
    """A loopback HTTP server over a temp dir holding the page, Pyodide, and kernels/ + shared/ as a zip."""
    missing = browser_missing()
    if missing:  # a failure, never a skip: a plain `pytest` must not pass without ever running the browser
        pytest.fail(f"the Pyodide kernel test needs a browser: {missing}")
    root = Path(tempfile.mkdtemp(prefix="kernels-browser-"))
    (root / "pyodide").symlink_to(PYODIDE_DIR)
    (root / "index.html").write_text(PAGE)
    with zipfile.ZipFile(root / "packages.zip", "w") as archive:
        for package in ("kernels", "shared"):
            for path in sorted((REPO / package).iterdir()):
                if path.suffix in (".py", ".wgsl"):
                    archive.write(path, f"{package}/{path.name}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    shutil.rmtree(root, ignore_errors=True)


async def run_in_chromium(base_url: str, python_code: str) -> dict:
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="kernels-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )

            async def loopback_only(route):
                if route.request.url.startswith(base_url + "/"):
                    await route.continue_()
                else:
                    await route.abort()

            await context.route("**/*", loopback_only)
            page = context.pages[0] if context.pages else await context.new_page()
            await page.goto(base_url + "/index.html")
            await page.evaluate("boot()")
            result = await page.evaluate("(code) => pyodide.runPythonAsync(code)", python_code)
            await context.close()
            return json.loads(result)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def decode_floats(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32)


def test_browser_device_trains_the_gpt_like_torch(site):
    root, base_url = site
    cfg, batch, seq = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), 3, 11
    model = GPT(cfg)
    init_parameters(model, 0)
    start = flat_parameters(model)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (batch, seq), generator=generator)
    targets = torch.randint(0, 256, (batch, seq), generator=generator)
    _, loss = model(tokens, targets)
    loss.backward()
    expected_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    (root / "params.bin").write_bytes(start.numpy().tobytes())
    (root / "tokens.bin").write_bytes(tokens.to(torch.uint8).numpy().tobytes())
    (root / "targets.bin").write_bytes(targets.to(torch.uint8).numpy().tobytes())
    code = (f"CONFIG = {json.dumps(json.dumps(cfg.to_dict()))}\nBATCH = {batch}\nSEQ = {seq}\n"
            f"HYPER = {HYPER!r}\nSPARSELOCO = {SPARSELOCO!r}\n" + IN_BROWSER)

    # its own thread and event loop: Playwright's sync API (the e2e fixtures) may hold this thread's loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(asyncio.run, run_in_chromium(base_url, code)).result()

    assert abs(result["loss"] - loss.item()) <= 1e-4 * loss.item()
    assert result["losses"] == [result["loss"]]  # the training step saw the same batch and parameters
    grads = decode_floats(result["grads"])
    for spec in parameter_layout(cfg):
        actual, expected = (g[spec.offset : spec.offset + spec.numel] for g in (grads, expected_grads))
        assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max(), spec.name
    # the AdamW step: torch.optim.AdamW here, from the same start parameters and hyperparameters, given the
    # browser's gradients (checked against torch's just above): Adam divides by |g|, so float32 rounding in a
    # gradient near zero would otherwise show as an update error of up to lr (tests/test_kernels_parity.py)
    reference = GPT(cfg)
    load_flat_parameters(reference, start)
    for spec, parameter in zip(parameter_layout(cfg), reference.parameters()):
        parameter.grad = grads[spec.offset : spec.offset + spec.numel].view_as(parameter).clone()
    torch.optim.AdamW(reference.parameters(), **HYPER).step()
    expected_local, local_tensor = flat_parameters(reference), decode_floats(result["local"])
    assert not torch.equal(expected_local, start)  # the step moved the parameters
    for spec in parameter_layout(cfg):
        actual, expected, before = (t[spec.offset : spec.offset + spec.numel]
                                    for t in (local_tensor, expected_local, start))
        assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max(), spec.name
        # measured against the update's own scale too: a step of ~lr would hide under a parameter's scale
        assert (actual - expected).abs().max() <= 1e-4 * (expected - before).abs().max(), spec.name
    local = array("f", base64.b64decode(result["local"]))
    pseudo_gradient = array("f", (g - p for g, p in zip(array("f", start.numpy().tobytes()), local)))
    expected_scales, expected_codes = quant.quantize_int8(pseudo_gradient)
    assert base64.b64decode(result["scales"]) == expected_scales.tobytes()
    assert base64.b64decode(result["codes"]) == expected_codes
    spec, feedback = compress.parse_codec(SPARSELOCO), compress.ErrorFeedback(len(pseudo_gradient))
    assert [base64.b64decode(p) for p in result["sparseloco"]] == [feedback.encode(spec, pseudo_gradient)
                                                                  for _ in range(2)]
