"""WGSL generation (kernels/generate.py) agrees with torch: the key/value-cache path gives a full forward's logits
at every position, and greedy and seeded sampling produce torch's tokens, token for token.

Runs on wgpu-py's default adapter (lavapipe in CI). The reference is server/sample.py's torch loop (a full forward
per token), which the e2e test and bench/bench_generate.py use too.
"""

from __future__ import annotations

import asyncio
import random
import re
from array import array

import pytest
import torch

from kernels.generate import (MAX_NEW_TOKENS, MAX_TEMPERATURE, ContextFull, DeviceGenerator, GenerationError,
                              choose_token, window_start)
from server import sample
from server.model import GPT, flat_parameters
from shared.model import MODEL_SIZES, GPTConfig
from tests.conftest import ROOT
from tests.test_kernels_parity import reference_model, relative_error

MAX_RELATIVE_ERROR = 1e-4  # as tests/test_kernels_parity.py
PROMPT = b"The swarm trains one model together: "
# a short context, so that a few dozen new tokens slide the window more than once
SHORT_CONTEXT = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
# a vocabulary past 256: token ids travel as uint16 (shared/tokens.py), as a BPE job's do
BPE_VOCAB = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=24, vocab_size=576)


def torch_generate(model: GPT, prompt, count: int, temperature: float = 0.0, seed: int | None = None) -> list[int]:
    """The reference: `python -m server sample`'s torch loop, which follows the same context rule and token choice."""
    return sample.generate(model, list(prompt), count, temperature=temperature, seed=seed)


def wgsl_generate(generator: DeviceGenerator, prompt, max_new_tokens: int, **options) -> list[int]:
    async def collect() -> list[int]:
        return [token async for token in generator.generate(prompt, max_new_tokens, **options)]

    return asyncio.run(collect())


def generator_for(device, model: GPT) -> DeviceGenerator:
    return DeviceGenerator(device, model.cfg, array("f", flat_parameters(model).numpy().tobytes()))


@pytest.mark.parametrize("cfg", [MODEL_SIZES["tiny"], BPE_VOCAB], ids=["tiny", "bpe_vocab"])
def test_cache_path_gives_the_full_forward_logits_at_every_position(device, cfg):
    model = reference_model(cfg, seed=3)
    generator = generator_for(device, model)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.block_size,), generator=torch.Generator().manual_seed(4)).tolist()

    async def logits_at_each_position() -> torch.Tensor:
        rows = []
        for token in tokens:
            generator.feed(token)
            rows.append(torch.tensor(await generator.read_logits()))
        return torch.stack(rows)

    got = asyncio.run(logits_at_each_position())
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0][0]
    errors = [relative_error(got[t], expected[t]) for t in range(len(tokens))]
    assert max(errors) <= MAX_RELATIVE_ERROR, f"worst position {errors.index(max(errors))}: {max(errors):.2e}"


def test_greedy_generation_equals_torch_token_for_token(device):
    model = reference_model(MODEL_SIZES["tiny"], seed=5)
    count = 60  # with the prompt, past block_size 64: the context slides once

    got = wgsl_generate(generator_for(device, model), PROMPT, count)

    assert got == torch_generate(model, PROMPT, count)
    assert len(PROMPT) + count > model.cfg.block_size


def test_greedy_generation_slides_the_context_like_torch(device):
    model = reference_model(SHORT_CONTEXT, seed=6)
    got = wgsl_generate(generator_for(device, model), PROMPT, 40)  # the prompt alone overflows the context
    assert got == torch_generate(model, PROMPT, 40)


def test_greedy_generation_with_a_bpe_vocabulary_equals_torch(device):
    model = reference_model(BPE_VOCAB, seed=9)
    prompt = [300, 575, 17, 256, 511]
    assert wgsl_generate(generator_for(device, model), prompt, 30) == torch_generate(model, prompt, 30)


def test_sampling_with_a_seed_draws_torch_tokens(device):
    model = reference_model(MODEL_SIZES["tiny"], seed=7)
    generator = generator_for(device, model)

    first = wgsl_generate(generator, PROMPT, 30, temperature=1.0, seed=11)

    assert first == torch_generate(model, PROMPT, 30, temperature=1.0, seed=11)
    assert wgsl_generate(generator, PROMPT, 30, temperature=1.0, seed=11) == first
    assert first != wgsl_generate(generator, PROMPT, 30, temperature=0.0)


def test_window_restarts_with_the_last_half_context_when_full():
    assert window_start(0, 64, 64) == 0
    assert window_start(0, 65, 64) == 33  # the last 32 tokens
    assert window_start(33, 97, 64) == 33
    assert window_start(33, 98, 64) == 66
    assert window_start(0, 17, 16) == 9


def test_choose_token_is_the_first_largest_at_temperature_zero():
    assert choose_token(array("f", [0.5, 2.0, 2.0, -1.0]), 0.0, random.Random(0)) == 1
    with pytest.raises(GenerationError, match="not finite"):
        choose_token(array("f", [0.0, float("nan")]), 0.0, random.Random(0))


def test_bad_requests_get_typed_errors(device):
    model = reference_model(SHORT_CONTEXT, seed=8)
    generator = generator_for(device, model)
    for prompt, count, options, message in [
        (b"", 4, {}, "prompt is empty"),
        (PROMPT, MAX_NEW_TOKENS + 1, {}, "max_new_tokens"),
        (PROMPT, 4, {"temperature": -0.5}, "temperature"),
        (PROMPT, 4, {"temperature": float("nan")}, "temperature"),
        ([256], 4, {}, "outside the vocabulary"),
    ]:
        with pytest.raises(GenerationError, match=message):
            wgsl_generate(generator, prompt, count, **options)
    generator.reset()
    for token in range(SHORT_CONTEXT.block_size):
        generator.feed(token)
    with pytest.raises(ContextFull):
        generator.feed(0)
    with pytest.raises(ValueError, match="must hold"):
        DeviceGenerator(device, SHORT_CONTEXT, array("f", [0.0] * 10))


def test_the_page_box_has_the_engines_limits():
    script = (ROOT / "browser" / "generate.js").read_text()
    limits = dict(re.findall(r"^const (MAX_TOKENS|MAX_TEMPERATURE) = (\d+);", script, re.MULTILINE))
    assert limits == {"MAX_TOKENS": str(MAX_NEW_TOKENS), "MAX_TEMPERATURE": str(int(MAX_TEMPERATURE))}
