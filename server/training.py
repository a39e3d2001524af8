"""Torch training primitives shared by the trainer, the coordinator's evaluation and the benchmarks.

Batches are windows of a byte string (inputs and next-byte targets). Never read data beyond the bytes given: a
node trains only on the shard it was assigned. Never let an update depend on anything but what `inner_steps`
takes: the spot check re-executes it from those alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from server.model import GPT
from shared.batches import ADAMW_BETAS, ADAMW_EPS
from shared.tokens import BYTE_VOCAB, read_tokens


def token_tensor(data: bytes, vocab_size: int = BYTE_VOCAB) -> torch.Tensor:
    """A shard's (or the validation part's) token ids as int64, read in the width of the job's vocabulary
    (shared.tokens.read_tokens, as every node reads them); TokenError for data that does not fit it."""
    ids = read_tokens(data, vocab_size)
    return torch.from_numpy(np.frombuffer(ids, dtype=np.uint8 if isinstance(ids, bytes) else np.uint16)
                            .astype(np.int64))


def byte_tensor(data: bytes) -> torch.Tensor:
    return token_tensor(data, BYTE_VOCAB)


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """`batch_size` random windows of `seq_len` tokens and their next-token targets."""
    if data.numel() < seq_len + 2:
        raise ValueError(f"{data.numel()} bytes is too little for windows of {seq_len} tokens")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


def batch_at(data: torch.Tensor, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `seq_len` tokens at `starts` (one row each, a step of shared.batches.batch_starts) and their
    next-token targets."""
    idx = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


def inner_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The fresh AdamW of a round's inner steps (shared.batches' betas and eps), over `model`'s parameters: one
    process's, or a rank's (server.distributed)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay)


def inner_steps(model: GPT, data: torch.Tensor, schedule: list[list[int]], seq_len: int, lr: float,
                weight_decay: float, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """One round's inner steps: an AdamW step per batch of `schedule` (shared.batches.batch_starts) on `data`,
    from a fresh optimizer, so that the update depends on the round's start parameters only. Trains `model` in
    place on its own device; returns each step's loss. `on_step(step, loss)` hears of each step as it ends.
    """
    device = next(model.parameters()).device
    optimizer = inner_optimizer(model, lr, weight_decay)
    model.train()
    losses = []
    for step, starts in enumerate(schedule):
        x, y = batch_at(data, starts, seq_len)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def validation_batches(data: bytes, seq_len: int, batch_size: int = 16, num_batches: int = 8, seed: int = 1234,
                       vocab_size: int = BYTE_VOCAB):
    """A fixed set of evaluation batches, the same for every evaluation of a job; `data` holds ids of a
    `vocab_size` vocabulary."""
    tensor = token_tensor(data, vocab_size)
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(tensor, batch_size, seq_len, gen) for _ in range(num_batches)]


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in batches]
    model.train()
    return float(sum(losses) / len(losses))
