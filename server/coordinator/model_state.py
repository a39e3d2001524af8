"""The global model as the coordinator holds it: the flat float32 parameters, the outer momentum, their hash and
the round they complete, held once; the bytes nodes download are derived from them on demand.

Never change the parameters in place: a new model is a new array (advance()), so the hash and the cached bytes
can never describe another model than the one held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from server.coordinator.checkpoint import Checkpoint, model_hash


@dataclass(eq=False)
class GlobalModel:
    """The model after `round` completed rounds.

    `params` and `momentum` are flat float32 arrays in shared.model's layout (`momentum` is None before the first
    outer step); `hash` is the sha256 nodes check a download against, `previous_hash` the last round's (None at
    round 0, or when the store does not know it), which a late update names.
    """

    round: int
    params: np.ndarray
    momentum: np.ndarray | None
    hash: str
    previous_hash: str | None = None
    _bytes: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, previous_hash: str | None) -> GlobalModel:
        params = np.ascontiguousarray(ckpt.params, np.float32)
        momentum = None if ckpt.momentum is None else np.ascontiguousarray(ckpt.momentum, np.float32)
        return cls(ckpt.round, params, momentum, model_hash(params), previous_hash)

    @property
    def bytes(self) -> bytes:
        """The parameters as little-endian float32 bytes (what a node downloads), made once per model."""
        if self._bytes is None:
            self._bytes = np.ascontiguousarray(self.params, "<f4").tobytes()
        return self._bytes

    def tensor(self) -> torch.Tensor:
        """The parameters as a torch tensor sharing their memory: read it, never write to it."""
        return torch.from_numpy(self.params)

    def momentum_tensor(self) -> torch.Tensor | None:
        return None if self.momentum is None else torch.from_numpy(self.momentum)

    def advance(self, ckpt: Checkpoint) -> None:
        """Make the checkpoint's model current (after its round is committed): the old hash becomes the previous
        one, and the cached bytes are dropped."""
        self.previous_hash = self.hash
        self.params = np.ascontiguousarray(ckpt.params, np.float32)
        self.momentum = None if ckpt.momentum is None else np.ascontiguousarray(ckpt.momentum, np.float32)
        self.hash = model_hash(self.params)
        self.round = ckpt.round
        self._bytes = None
