"""The page's WGSL kernels compute the same loss and gradients as torch autograd for a fixed batch.

It runs the kernels/ driver inside Pyodide on Chromium's WebGPU (SwiftShader here), through the page's
window.swarmgrad.gradientForBatch hook, against server.model.GPT with the same parameters and batch.
"""

from __future__ import annotations

import base64

import pytest
import torch

from server.model import GPT, flat_parameters, init_parameters
from shared.model import MODEL_SIZES, parameter_layout

MAX_RELATIVE_ERROR = 1e-4  # as tests/test_kernels_parity.py: max |difference| / max |torch value|, per tensor
BATCH, SEQ = 2, 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.timeout(120)
def test_page_gradient_matches_torch_for_a_fixed_batch(processes, chromium):
    coordinator = processes.coordinator()
    coordinator.wait_ready()
    cfg = MODEL_SIZES["tiny"]
    model = GPT(cfg)
    init_parameters(model, 7)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():  # move LayerNorm weights and biases off 1 and 0, so that ignoring them would show
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    tokens = torch.randint(0, 256, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, 256, (BATCH, SEQ), generator=generator)
    _, loss = model(tokens, targets)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    page = chromium(webgpu=True, webrtc=False).page()
    page.goto(coordinator.url + "/")
    page.wait_for_function("() => window.swarmgrad !== undefined")
    result = page.evaluate(
        "([params, tokens, targets, seq]) => swarmgrad.gradientForBatch('tiny', params, tokens, targets, seq)",
        [b64(flat_parameters(model).numpy().tobytes()), b64(tokens.to(torch.uint8).numpy().tobytes()),
         b64(targets.to(torch.uint8).numpy().tobytes()), SEQ])

    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    grads = torch.frombuffer(bytearray(base64.b64decode(result["grads"])), dtype=torch.float32)
    assert grads.numel() == expected.numel()
    errors = {}
    for spec in parameter_layout(cfg):
        got, want = grads[spec.offset : spec.offset + spec.numel], expected[spec.offset : spec.offset + spec.numel]
        errors[spec.name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, {k: f"{v:.2e}" for k, v in errors.items()}
