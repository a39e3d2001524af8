"""The WGSL GPT (kernels/) agrees with torch: loss, every gradient, AdamW steps, and the int8 codec's bytes.

Runs on wgpu-py's default adapter (lavapipe in CI). No adapter is a failure, never a skip: CI installs lavapipe.
"""

from __future__ import annotations

import asyncio
import random
import struct
from array import array

import pytest
import torch

from kernels import quant
from kernels.int8_codec import DeviceInt8Codec
from kernels.trainer import DeviceTrainer
from server.model import GPT, flat_parameters, init_parameters
from shared.model import MODEL_SIZES, GPTConfig, parameter_layout

MAX_RELATIVE_ERROR = 1e-4

# (config, batch size, sequence length): tiny at full context, and a one-layer model with T < block_size
# and B * T not a multiple of 4, which exercises every kernel's edge handling.
SHAPES = {
    "tiny": (MODEL_SIZES["tiny"], 2, 64),
    "one_layer_short_seq": (GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), 3, 11),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: an error measured against the tensor's own scale."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def reference_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """An initialised torch GPT whose biases and LayerNorm weights are perturbed away from 0 and 1,
    so that a kernel that ignored them would fail."""
    model = GPT(cfg)
    init_parameters(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def random_batch(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (batch, seq), generator=generator)
    targets = torch.randint(0, 256, (batch, seq), generator=generator)
    return tokens, targets


def as_bytes(tokens: torch.Tensor) -> bytes:
    return tokens.to(torch.uint8).numpy().tobytes()


def as_array(flat: torch.Tensor) -> array:
    return array("f", flat.numpy().tobytes())


def as_tensor(values: array) -> torch.Tensor:
    return torch.frombuffer(bytearray(values.tobytes()), dtype=torch.float32)


def run(coroutine):
    return asyncio.run(coroutine)


def torch_training_losses(model: GPT, batches, hyper: dict) -> list[float]:
    """Train `model` in place with one torch AdamW step (`hyper`) per (tokens, targets) batch; each step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), **hyper)
    losses = []
    for tokens, targets in batches:
        optimizer.zero_grad()
        _, loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_each_parameter_close(cfg: GPTConfig, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    errors = {
        spec.name: relative_error(
            actual[spec.offset : spec.offset + spec.numel], expected[spec.offset : spec.offset + spec.numel]
        )
        for spec in parameter_layout(cfg)
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= MAX_RELATIVE_ERROR, f"{what} of {worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_every_gradient_match_torch_autograd(device, shape):
    cfg, batch, seq = SHAPES[shape]
    model = reference_model(cfg)
    tokens, targets = random_batch(batch, seq, torch.Generator().manual_seed(2))
    _, loss = model(tokens, targets)
    loss.backward()
    expected_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(model)), max_batch_size=batch)
    device_loss, grads = run(trainer.loss_and_grads(as_bytes(tokens), as_bytes(targets), seq_len=seq))

    assert abs(device_loss - loss.item()) <= MAX_RELATIVE_ERROR * abs(loss.item())
    assert_each_parameter_close(cfg, as_tensor(grads), expected_grads, "gradient")


def test_gradients_are_bitwise_reproducible(device):
    cfg, batch, seq = SHAPES["one_layer_short_seq"]
    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(reference_model(cfg))), max_batch_size=batch)
    tokens, targets = (as_bytes(t) for t in random_batch(batch, seq, torch.Generator().manual_seed(3)))
    first_loss, first = run(trainer.loss_and_grads(tokens, targets, seq_len=seq))
    second_loss, second = run(trainer.loss_and_grads(tokens, targets, seq_len=seq))
    assert first_loss == second_loss
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_adamw_step_matches_torch_adamw_given_the_same_gradients(device, shape):
    cfg, batch, seq = SHAPES[shape]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model = reference_model(cfg)
    start = flat_parameters(model)
    trainer = DeviceTrainer(device, cfg, as_array(start), max_batch_size=batch)
    tokens, targets = (as_bytes(t) for t in random_batch(batch, seq, torch.Generator().manual_seed(4)))
    _, grads = run(trainer.loss_and_grads(tokens, targets, seq_len=seq))
    # Adam divides by |g|, so gradients that differ by float32 rounding give visibly different updates where
    # g is near zero; feeding torch the device's own gradients isolates the optimizer's arithmetic.
    device_grads = as_tensor(grads)
    for spec, p in zip(parameter_layout(cfg), model.parameters()):
        p.grad = device_grads[spec.offset : spec.offset + spec.numel].view_as(p).clone()
    torch.optim.AdamW(model.parameters(), **hyper).step()

    run(trainer.train_steps([(tokens, targets)], seq_len=seq, **hyper))  # recomputes bitwise the same grads
    after = as_tensor(run(trainer.read_params()))

    expected = flat_parameters(model)
    assert_each_parameter_close(cfg, after, expected, "parameters after one AdamW step")
    assert_each_parameter_close(cfg, after - start, expected - start, "AdamW update")


@pytest.mark.parametrize("shape", SHAPES)
def test_train_steps_match_torch_training(device, shape):
    cfg, batch, seq = SHAPES[shape]
    # Where a gradient is near zero, Adam's g / (|g| + eps) turns float32 rounding into an update error of up
    # to ~lr; a small lr keeps that below the tolerance. The optimizer's arithmetic is pinned down exactly
    # by test_adamw_step_matches_torch_adamw_given_the_same_gradients.
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model = reference_model(cfg)
    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(model)), max_batch_size=batch)
    generator = torch.Generator().manual_seed(5)
    batches = [random_batch(batch, seq, generator) for _ in range(2)]
    expected_losses = torch_training_losses(model, batches, hyper)

    losses = run(trainer.train_steps([(as_bytes(t), as_bytes(y)) for t, y in batches], seq_len=seq, **hyper))

    assert len(losses) == len(batches)
    for actual, expected in zip(losses, expected_losses):
        assert abs(actual - expected) <= MAX_RELATIVE_ERROR * abs(expected)
    after = as_tensor(run(trainer.read_params()))
    assert_each_parameter_close(cfg, after, flat_parameters(model), "parameters after two AdamW steps")


def test_pseudo_gradient_int8_is_the_reference_quantisation_of_global_minus_local(device):
    cfg, batch, seq = SHAPES["one_layer_short_seq"]
    start = as_array(flat_parameters(reference_model(cfg)))
    trainer = DeviceTrainer(device, cfg, start, max_batch_size=batch)
    tokens, targets = (as_bytes(t) for t in random_batch(batch, seq, torch.Generator().manual_seed(6)))
    run(trainer.train_steps([(tokens, targets)], lr=1e-2, seq_len=seq))
    local = run(trainer.read_params())

    scales, codes = run(trainer.pseudo_gradient_int8())

    pseudo_gradient = array("f", (g - p for g, p in zip(start, local)))  # float32(global - local)
    expected_scales, expected_codes = quant.quantize_int8(pseudo_gradient)
    assert scales.tobytes() == expected_scales.tobytes()
    assert codes == expected_codes


def awkward_values(count: int, seed: int) -> array:
    """Float32 values that stress the rule: ties, zero and sub-threshold blocks, subnormals, mixed scales."""
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 10.0 ** rng.randint(-8, 2)) for _ in range(count)]
    values[0:256] = [rng.uniform(-1.0, 1.0) for _ in range(256)]
    values[0:4] = [127.0, 2.5, -2.5, 0.5]  # 127 x / amax lands exactly on halves: round away from zero
    values[256:512] = [0.0] * 256  # an all-zero block
    values[512:768] = [rng.uniform(-1, 1) * 2.0**-101 for _ in range(256)]  # below MIN_BLOCK_AMAX
    values[768:772] = [1e-3, 1e-40, -1e-45, -1e-3]  # subnormals inside a normal block
    for i in range(1024, 1280):  # every half-integer code in one block
        values[i] = (((i - 1024) % 255) - 127 + 0.5) * (3.0 / 127)
    values[1280] = 127.5 * 3.0 / 127
    return array("f", values)


def test_device_int8_quantize_matches_reference_byte_for_byte(device):
    values = awkward_values(2000, seed=6)  # 8 blocks, the last one partial
    codec = DeviceInt8Codec(device, len(values))
    scales, codes = run(codec.encode(values))
    expected_scales, expected_codes = quant.quantize_int8(values)
    assert scales.tobytes() == expected_scales.tobytes()
    assert codes == expected_codes


def test_device_int8_dequantize_matches_reference_byte_for_byte(device):
    values = awkward_values(1500, seed=7)
    scales, codes = quant.quantize_int8(values)
    codec = DeviceInt8Codec(device, len(values))
    decoded = run(codec.decode(scales, codes))
    assert decoded.tobytes() == quant.dequantize_int8(scales, codes).tobytes()
    assert struct.unpack("<f", decoded.tobytes()[:4])[0] == 127.0


def test_pseudo_gradient_fp32_is_global_minus_local_bit_for_bit(device):
    cfg, batch, seq = SHAPES["tiny"]
    model = reference_model(cfg)
    start = flat_parameters(model)
    trainer = DeviceTrainer(device, cfg, as_array(start), max_batch_size=batch)
    tokens, targets = random_batch(batch, seq, torch.Generator().manual_seed(5))
    run(trainer.train_steps([(as_bytes(tokens), as_bytes(targets))], lr=1e-2, seq_len=seq))
    local = as_tensor(run(trainer.read_params()))
    got = torch.frombuffer(bytearray(run(trainer.pseudo_gradient_fp32())), dtype=torch.float32)
    assert torch.equal(got, start - local)
    assert got.abs().max() > 0  # the step moved the parameters
