"""Torch training primitives shared by the trainer, the coordinator's evaluation and the benchmarks.

Batches are random windows of a byte string (inputs and next-byte targets). Never read data beyond the bytes
given: a node trains only on the shard it was assigned.
"""

from __future__ import annotations

import numpy as np
import torch

from server.model import GPT


def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """`batch_size` random windows of `seq_len` tokens and their next-token targets."""
    if data.numel() < seq_len + 2:
        raise ValueError(f"{data.numel()} bytes is too little for windows of {seq_len} tokens")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


def validation_batches(data: bytes, seq_len: int, batch_size: int = 16, num_batches: int = 8, seed: int = 1234):
    """A fixed set of evaluation batches, the same for every evaluation of a job."""
    tensor = byte_tensor(data)
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(tensor, batch_size, seq_len, gen) for _ in range(num_batches)]


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in batches]
    model.train()
    return float(sum(losses) / len(losses))
