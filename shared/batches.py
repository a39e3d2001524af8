"""The inner steps every node runs the same way: which shard windows each step reads, and the AdamW constants.

An update must be a function of (theta_r, shard, batch seed, H, batch, seq, lr, weight decay) and nothing else, so
that the coordinator can re-execute it. Never draw batches from anything but `batch_seed`, and never change this
schedule without a new job: every update ever spot-checked was sampled by it.
"""

from __future__ import annotations

import hashlib
import random

# The inner optimizer: torch.optim.AdamW's defaults, which the torch trainer, the WGSL trainer (browser) and the
# spot check all pass explicitly. A node that used other constants would fail every spot check.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


class ScheduleError(ValueError):
    """The shard is too short for the asked windows; a longer shard or a shorter sequence is needed."""


def batch_seed(node_id: str, round_: int) -> int:
    """The seed of a node's batch sampling in round `round_`: the first 8 bytes of sha256("node_id:round"),
    little-endian, so that no node can choose its own batches."""
    return int.from_bytes(hashlib.sha256(f"{node_id}:{round_}".encode()).digest()[:8], "little")


def batch_starts(shard_len: int, steps: int, batch_size: int, seq_len: int, seed: int) -> list[list[int]]:
    """Where each of the `steps` batches reads its `batch_size` windows of `seq_len` + 1 bytes (inputs, then the
    next-byte targets shifted by one), as offsets into the shard: starts[step][row].

    Python's random.Random(seed).randrange(shard_len - seq_len - 1), row after row, step after step; it is the
    same in CPython and in Pyodide.
    """
    high = shard_len - seq_len - 1
    if high <= 0:
        raise ScheduleError(f"a shard of {shard_len} bytes is too short for windows of {seq_len} tokens")
    rng = random.Random(seed)
    return [[rng.randrange(high) for _ in range(batch_size)] for _ in range(steps)]


def tokens_allowed(steps: int, batch_size: int, seq_len: int) -> int:
    """The most tokens an update for an assignment of `steps` x `batch_size` windows of `seq_len` can claim."""
    return steps * batch_size * seq_len
