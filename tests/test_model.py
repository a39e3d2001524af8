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
