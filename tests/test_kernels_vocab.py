"""The WGSL GPT at BPE vocabularies (2048 and 8192 tokens) agrees with torch: the loss, the embedding, lm_head and every
other gradient, and AdamW training, with token ids sent as shards carry them (little-endian uint16, shared/tokens.py).

Runs on wgpu-py's default adapter (lavapipe in CI). No adapter is a failure, never a skip: CI installs lavapipe.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from browser.browser_node import batches_at
from kernels.trainer import DeviceTrainer
from server.model import flat_parameters
from server.training import batch_at, token_tensor
from shared.model import GPTConfig
from shared.tokens import read_tokens, write_tokens
from tests.test_kernels_parity import (MAX_RELATIVE_ERROR, as_array, as_tensor, assert_each_parameter_close,
                                       reference_model, run, torch_training_losses)

SMALL = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
# (vocab, batch, sequence length): B x T = 33 is odd, so the last uint16 id shares its u32 word with padding
SHAPES = {"bpe_2048": (2048, 3, 11), "bpe_8192": (8192, 2, 16)}


def bpe_batch(vocab: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids across the whole vocabulary: the last id, ids just past the byte range (whose low byte repeats a byte
    token's: a kernel that read only 8 bits would take them for bytes) and one id repeated (the wte gradient then
    sums several rows into one)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    tokens[0, :4] = torch.tensor([vocab - 1, 256 + 7, 7, 256 + 7])
    targets[0, :3] = torch.tensor([vocab - 1, 256 + 7, 7])
    return tokens, targets


def wire(ids: torch.Tensor, vocab: int) -> bytes:
    return write_tokens(ids.reshape(-1).tolist(), vocab)


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_every_gradient_match_torch_at_bpe_vocab(device, shape):
    vocab, batch, seq = SHAPES[shape]
    cfg = replace(SMALL, vocab_size=vocab)
    model = reference_model(cfg)
    tokens, targets = bpe_batch(vocab, batch, seq, seed=2)
    _, loss = model(tokens, targets)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(model)), max_batch_size=batch)
    device_loss, grads = run(trainer.loss_and_grads(wire(tokens, vocab), wire(targets, vocab), seq_len=seq))

    assert abs(device_loss - loss.item()) <= MAX_RELATIVE_ERROR * abs(loss.item())
    assert_each_parameter_close(cfg, as_tensor(grads), expected, "gradient")
    wte = as_tensor(grads)[: vocab * cfg.n_embd].view(vocab, cfg.n_embd)
    unused = sorted(set(range(vocab)) - set(tokens.reshape(-1).tolist()))
    assert torch.count_nonzero(wte[unused]) == 0  # rows of ids not in the batch get no gradient
    assert torch.count_nonzero(wte[vocab - 1]) > 0 and torch.count_nonzero(wte[256 + 7]) > 0


def test_training_steps_match_torch_at_vocab_8192(device):
    vocab, batch, seq = SHAPES["bpe_8192"]
    cfg = replace(SMALL, vocab_size=vocab)
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # small lr: see test_kernels_parity
    model = reference_model(cfg)
    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(model)), max_batch_size=batch)
    batches = [bpe_batch(vocab, batch, seq, seed) for seed in (3, 4)]
    expected_losses = torch_training_losses(model, batches, hyper)

    losses = run(trainer.train_steps([(wire(t, vocab), wire(y, vocab)) for t, y in batches], seq_len=seq, **hyper))

    assert losses == pytest.approx(expected_losses, rel=MAX_RELATIVE_ERROR)
    assert_each_parameter_close(cfg, as_tensor(run(trainer.read_params())), flat_parameters(model),
                                "parameters after two AdamW steps")


def test_a_browser_batch_from_a_bpe_shard_is_the_batch_torch_trains_on(device):
    """The browser's path (read_tokens, then batches_at's slices packed as they are) gives the GPU the same ids,
    and so the same loss and gradients bit for bit, as the ids handed over as a list of ints."""
    vocab, batch, seq = 2048, 3, 11
    cfg = replace(SMALL, vocab_size=vocab)
    shard = write_tokens(torch.randint(0, vocab, (400,), generator=torch.Generator().manual_seed(8)).tolist(), vocab)
    starts = [5, 200, 388]
    ((tokens, targets),) = batches_at(read_tokens(shard, vocab), [starts], seq)
    torch_x, torch_y = batch_at(token_tensor(shard, vocab), starts, seq)  # what the torch trainer trains on
    trainer = DeviceTrainer(device, cfg, as_array(flat_parameters(reference_model(cfg))), max_batch_size=batch)

    from_shard = run(trainer.loss_and_grads(tokens, targets, seq_len=seq))
    from_ints = run(trainer.loss_and_grads(torch_x.reshape(-1).tolist(), torch_y.reshape(-1).tolist(), seq_len=seq))

    assert from_shard[0] == from_ints[0]
    assert from_shard[1].tobytes() == from_ints[1].tobytes()


def test_a_vocabulary_the_kernels_cannot_tile_is_refused(device):
    with pytest.raises(ValueError, match="divide by 4"):
        DeviceTrainer(device, replace(SMALL, vocab_size=1002), as_array(flat_parameters(reference_model(SMALL))))
