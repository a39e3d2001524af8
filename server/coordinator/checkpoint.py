"""Checkpoint files: the global parameters and the outer optimizer's momentum after a round, written atomically.

A checkpoint is written (temp file, fsync, rename, fsync of the directory) before the round that produced it is
committed in the store, so a committed round always has its file. Never overwrite a checkpoint in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SGCKPT01"
_LEN = struct.Struct("<I")
CHECKPOINTS_KEPT = 5  # when no storage rule bounds it


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated or does not match its recorded hash."""


@dataclass
class Checkpoint:
    round: int
    params: np.ndarray  # float32, flat, shared.model layout
    momentum: np.ndarray | None  # float32 outer Nesterov buffer; None before the first outer step

    @property
    def model_hash(self) -> str:
        return model_hash(self.params)


def model_hash(params: np.ndarray) -> str:
    """sha256 of the little-endian float32 bytes: what peers check a downloaded model against."""
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()


def checkpoint_path(directory: Path, round_: int) -> Path:
    return directory / f"round-{round_:06d}.ckpt"


def write_checkpoint(directory: Path, ckpt: Checkpoint) -> tuple[Path, str]:
    """Write atomically; returns (path, sha256 of the file) for the store to record."""
    directory.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"round": ckpt.round, "n": int(ckpt.params.size),
                         "momentum": ckpt.momentum is not None}).encode()
    body = [MAGIC, _LEN.pack(len(header)), header, np.ascontiguousarray(ckpt.params, "<f4").tobytes()]
    if ckpt.momentum is not None:
        body.append(np.ascontiguousarray(ckpt.momentum, "<f4").tobytes())
    path = checkpoint_path(directory, ckpt.round)
    tmp = path.with_suffix(".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in body:
            f.write(part)
            digest.update(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path, digest.hexdigest()


def prune_checkpoints(directory: Path, kept: int | None) -> None:
    """Delete all but the `kept` newest checkpoints (CHECKPOINTS_KEPT when None; the newest always stays), except
    the initial model's: it defines the job's start."""
    kept = CHECKPOINTS_KEPT if kept is None else max(1, kept)
    for path in sorted(directory.glob("round-*.ckpt"))[:-kept]:
        if path.name != checkpoint_path(directory, 0).name:
            path.unlink(missing_ok=True)


def read_checkpoint(path: Path, expected_sha256: str | None = None) -> Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(f"checkpoint {path} does not match the hash recorded in the store")
    if data[:8] != MAGIC:
        raise CheckpointError(f"{path} is not a swarmgrad checkpoint")
    (hlen,) = _LEN.unpack_from(data, 8)
    header = json.loads(data[12 : 12 + hlen])
    n, off = header["n"], 12 + hlen
    need = off + 4 * n * (2 if header["momentum"] else 1)
    if len(data) != need:
        raise CheckpointError(f"{path} has {len(data)} bytes, expected {need}")
    params = np.frombuffer(data, "<f4", n, off).astype(np.float32)
    momentum = np.frombuffer(data, "<f4", n, off + 4 * n).astype(np.float32) if header["momentum"] else None
    return Checkpoint(header["round"], params, momentum)
