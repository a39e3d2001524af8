"""The parameter layout in shared/ is the contract between the torch model and the WGSL model."""

from __future__ import annotations

import pytest
import torch

from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from shared.model import MODEL_SIZES, GPTConfig, model_config, num_parameters, parameter_layout


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_torch_parameters_follow_the_shared_layout(name):
    cfg = MODEL_SIZES[name]
    model = GPT(cfg)
    layout = parameter_layout(cfg)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [(s.name, s.shape) for s in layout]
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg)
    offsets = [s.offset for s in layout]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_named_sizes_are_in_their_intended_ranges():
    assert 100_000 <= num_parameters(MODEL_SIZES["tiny"]) <= 150_000
    assert 1_000_000 <= num_parameters(MODEL_SIZES["small"]) <= 10_000_000


def test_flat_vector_places_each_tensor_at_its_layout_offset():
    cfg = MODEL_SIZES["tiny"]
    model = GPT(cfg)
    init_parameters(model, seed=3)
    flat = flat_parameters(model)
    params = dict(model.named_parameters())
    for spec in parameter_layout(cfg):
        assert torch.equal(flat[spec.offset : spec.offset + spec.numel].view(spec.shape), params[spec.name].detach())


def test_load_flat_parameters_round_trips_and_checks_length():
    cfg = MODEL_SIZES["tiny"]
    a, b = GPT(cfg), GPT(cfg)
    init_parameters(a, seed=1)
    load_flat_parameters(b, flat_parameters(a))
    assert torch.equal(flat_parameters(a), flat_parameters(b))
    with pytest.raises(ValueError, match="elements"):
        load_flat_parameters(b, torch.zeros(5))


def test_initialisation_is_deterministic_per_seed():
    cfg = MODEL_SIZES["tiny"]
    a, b, c = GPT(cfg), GPT(cfg), GPT(cfg)
    init_parameters(a, 7), init_parameters(b, 7), init_parameters(c, 8)
    assert torch.equal(flat_parameters(a), flat_parameters(b))
    assert not torch.equal(flat_parameters(a), flat_parameters(c))


def test_bad_configs_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(n_layer=1, n_head=3, n_embd=64, block_size=8)
    with pytest.raises(KeyError, match="known"):
        model_config("huge")
    model = GPT(MODEL_SIZES["tiny"])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_untrained_loss_is_near_uniform_over_bytes():
    model = GPT(MODEL_SIZES["tiny"])
    init_parameters(model, 0)
    x = torch.randint(0, 256, (4, 64))
    _, loss = model(x, x)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.2


# -- model sizes: gpt2-124m, the custom form, and the training-memory estimate (issue 14) --------------------------


def test_gpt2_124m_has_gpt2_small_shape_and_is_byte_level():
    cfg = model_config("gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 256)
    # GPT-2 small's 124,439,808 parameters less its 50257-token embedding, plus our untied 256-token head
    assert num_parameters(cfg) == 124_439_808 - 50257 * 768 + 2 * 256 * 768


def test_the_custom_form_parses_in_any_order_to_one_spelling():
    from shared.model import canonical_model

    cfg = model_config("n_layer=8,n_head=8,n_embd=512,block_size=256")
    assert cfg == GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=256)
    assert model_config(" block_size=256, n_embd=512,n_head=8 ,n_layer=8") == cfg
    assert canonical_model(" block_size=256, n_embd=512,n_head=8 ,n_layer=8") == \
        "n_layer=8,n_head=8,n_embd=512,block_size=256"
    assert canonical_model("tiny") == "tiny"


@pytest.mark.parametrize("text, message", [
    ("huge", "unknown model size 'huge'; known: tiny, small, base, gpt2-124m"),
    ("n_layer=8,n_head=8,n_embd=512", "lacks block_size"),
    ("n_layer=8,n_layer=2,n_head=8,n_embd=512,block_size=256", "n_layer is given twice"),
    ("n_layer=eight,n_head=8,n_embd=512,block_size=256", "n_layer must be a positive integer, got 'eight'"),
    ("n_layer=-1,n_head=8,n_embd=512,block_size=256", "n_layer must be a positive integer"),
    ("n_layer=0,n_head=8,n_embd=512,block_size=256", r"n_layer=0 must lie in 1\.\.1024"),
    ("n_layer=8,n_head=8,n_embd=512,block_size=256,vocab_size=5", "the vocabulary comes from the tokenizer"),
    ("n_layer=8,n_head=7,n_embd=512,block_size=256", "n_embd=512 must be a multiple of n_head=7"),
    ("n_layer=8,n_head=8,n_embd=24,block_size=256", "head size n_embd/n_head = 3 must be a multiple of 4"),
    ("n_layer=1024,n_head=64,n_embd=65536,block_size=256", "more than 4,294,967,295"),
])
def test_a_bad_model_is_a_typed_error_that_says_what_is_wrong(text, message):
    from shared.model import ModelSpecError

    with pytest.raises(ModelSpecError, match=message) as caught:
        model_config(text)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, KeyError)  # both kinds of caller


def test_the_serve_command_refuses_a_bad_model_before_starting(capsys):
    from server.cli import serve_parser

    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--model", "n_layer=2,n_head=3,n_embd=64,block_size=64"])
    assert "n_embd=64 must be a multiple of n_head=3" in capsys.readouterr().err
    assert serve_parser().parse_args(["--model", "block_size=64,n_layer=2,n_head=4,n_embd=64"]).model == \
        "n_layer=2,n_head=4,n_embd=64,block_size=64"


# one config per buffer that can be the largest: the parameters, the attention probabilities, the logits
LARGEST_BUFFER_CASES = [(MODEL_SIZES["tiny"], 2, "params"),
                        (GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=64), 4, "h0.probs"),
                        (GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8), 64, "logits, then dlogits")]


@pytest.mark.parametrize("cfg, batch, largest", LARGEST_BUFFER_CASES)
def test_the_memory_estimate_is_what_the_wgsl_trainer_allocates(cfg, batch, largest):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from kernels.device_wgpu import WgpuDevice
    from kernels.trainer import LOSS_SLOTS, DeviceTrainer
    from shared.model import training_memory

    class RecordingDevice(WgpuDevice):  # the real device; it only notes each buffer's size
        def __init__(self):
            super().__init__()
            self.buffers: dict[str, int] = {}

        def create_buffer(self, size_bytes: int, label: str = ""):
            self.buffers[f"{label} #{len(self.buffers)}"] = size_bytes
            return super().create_buffer(size_bytes, label)

    device = RecordingDevice()
    model = GPT(cfg)
    init_parameters(model, 0)
    trainer = DeviceTrainer(device, cfg, flat_parameters(model).numpy().tobytes(), max_batch_size=batch)
    with ThreadPoolExecutor(1) as thread:  # a loop of its own, whatever loop (Playwright's) runs in this thread
        thread.submit(asyncio.run, trainer.pseudo_gradient_fp32()).result()  # the update's buffer, made on first use
    estimate = training_memory(cfg, batch)
    name, size = max(device.buffers.items(), key=lambda item: item[1])
    assert name.startswith(largest) and size == estimate.largest_buffer_bytes
    # what the estimate leaves out: fixed-size buffers (the loss slots, dims) and ones under 1% (token ids, scales)
    unestimated = sum(device.buffers.values()) - estimate.total_bytes
    assert 0 <= unestimated <= estimate.total_bytes // 100 + 4 * LOSS_SLOTS + 256, device.buffers


def test_the_memory_estimate_follows_its_formula_for_gpt2_124m():
    from shared.model import TRAINING_BYTES_PER_PARAMETER, training_memory

    cfg, batch = model_config("gpt2-124m"), 8
    m = training_memory(cfg, batch)
    p, c, t = num_parameters(cfg), 768, 1024
    assert (m.parameters, m.model_bytes, m.state_bytes) == (p, 4 * p, TRAINING_BYTES_PER_PARAMETER * p)
    assert TRAINING_BYTES_PER_PARAMETER == 25
    floats_per_row = 12 * (16 * c + 4 + 12 * t) + (2 * c + 3 + 256) + (10 * c + 12 * t)
    assert m.activation_bytes == 4 * batch * t * floats_per_row
    assert m.largest_buffer_bytes == 4 * batch * 12 * t * t  # the attention probabilities of one layer
    assert m.to_dict()["total_bytes"] == m.state_bytes + m.activation_bytes
