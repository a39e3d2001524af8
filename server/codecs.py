"""Fast codecs: torch encoders for the trainer and numpy decoders for the coordinator.

They implement shared/compress.py's spec (its module docstring) byte for byte; tests prove it. Never change
the wire format here, and never let a decoder allocate more than spec and n allow.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.compress import (INT8_LEVELS, INT8_MIN_BLOCK_AMAX, CodecError, CodecSpec, encoded_size, int8_block,
                             pack, topk_count, unpack)


def _check_finite(values: torch.Tensor) -> None:
    # A sum is the cheap screen; finite values can overflow a float32 sum, so only then look closer.
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        index = int(torch.nonzero(~torch.isfinite(values))[0, 0])
        raise CodecError(f"value {index} is {float(values[index])}; only finite values can be encoded")


def _int8_encode(values: torch.Tensor, block: int) -> bytes:
    n = values.numel()
    blocks = -(-n // block)
    padded = torch.zeros(blocks * block, dtype=torch.float64)
    padded[:n] = values
    padded = padded.view(blocks, block)
    amax = padded.abs().amax(dim=1)
    zero = amax < INT8_MIN_BLOCK_AMAX
    # A tensor divisor: torch may turn division by a Python number into multiplication by its reciprocal.
    scales = (amax / torch.full_like(amax, INT8_LEVELS)).to(torch.float32)
    scales[zero] = 0
    # The spec's exact quotient 127 x / amax: in float64 it lands on a half-integer only when it is one.
    quotients = INT8_LEVELS * padded / torch.where(zero, torch.ones_like(amax), amax)[:, None]
    levels = (torch.sign(quotients) * torch.floor(quotients.abs() + 0.5)).clamp_(-INT8_LEVELS, INT8_LEVELS)
    levels[zero] = 0
    q = levels.to(torch.int8).reshape(-1)[:n]
    return scales.numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k largest |x|, ties to the lower index (shared.compress's rule)."""
    n = values.numel()
    if k == n:
        return torch.arange(n)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    magnitudes = values.abs()
    threshold = torch.kthvalue(magnitudes, n - k + 1).values
    above = torch.nonzero(magnitudes > threshold).reshape(-1)
    at = torch.nonzero(magnitudes == threshold).reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, at])).values


def encode_torch(spec: CodecSpec, values: torch.Tensor) -> bytes:
    """Encode a 1-D float32 tensor (the trainer's pseudo-gradient) exactly as shared.compress.encode does."""
    return pack(spec, _encode_raw(spec, values.detach().reshape(-1).to(device="cpu", dtype=torch.float32)))


def _encode_raw(spec: CodecSpec, values: torch.Tensor) -> bytes:
    """The codec's bytes before the deflate stage, from a 1-D float32 CPU tensor."""
    encoded_size(spec, values.numel())  # checks the codec name and params before any work
    _check_finite(values)
    if spec.name == "fp32":
        return values.numpy().astype("<f4", copy=False).tobytes()
    if spec.name == "fp16":
        half = values.half()
        if not bool(torch.isfinite(half).all()):
            raise CodecError("a value exceeds half precision's range (|x| <= 65504); use fp32 or int8")
        return half.numpy().astype("<f2").tobytes()
    if spec.name == "int8":
        return _int8_encode(values, int8_block(spec))
    if spec.name == "topk":
        indices = topk_indices(values, topk_count(spec, values.numel()))
        count = np.array([indices.numel()], dtype="<u4").tobytes()
        kept = values[indices].numpy().astype("<f4", copy=False)
        return count + indices.numpy().astype("<u4").tobytes() + kept.tobytes()
    raise CodecError(f"unknown codec {spec.name!r}")


def apply_delta(params: np.ndarray, spec: CodecSpec, data: bytes) -> np.ndarray:
    """float32 `params` plus an encoded delta's decoded values, as a new float32 array: the one way the coordinator
    and every Python node apply a round's delta, so that all hold the same bytes."""
    return np.add(params, decode_numpy(spec, data, params.size), dtype=np.float32)


def decode_numpy(spec: CodecSpec, data: bytes, n: int) -> np.ndarray:
    """Decode wire bytes of n values into a new float32 array, checking them as shared.compress.decode does."""
    return _decode_raw(spec, unpack(spec, data, n), n)


def _decode_raw(spec: CodecSpec, data: bytes, n: int) -> np.ndarray:
    """Float32 values from the codec's bytes before the deflate stage (their length already checked)."""
    if spec.name == "fp32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if spec.name == "fp16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if spec.name == "int8":
        block = int8_block(spec)
        blocks = -(-n // block)
        scales = np.frombuffer(data, dtype="<f4", count=blocks).astype(np.float32)
        bad = np.flatnonzero(~(np.isfinite(scales) & (scales >= 0)))
        if bad.size:
            raise CodecError(f"int8 block {bad[0]} has scale {scales[bad[0]]}; scales are finite and >= 0")
        q = np.frombuffer(data, dtype=np.int8, offset=4 * blocks)
        bad = np.flatnonzero(q < -INT8_LEVELS)
        if bad.size:
            raise CodecError(f"int8 value {bad[0]} is {q[bad[0]]}; levels run from -127 to 127")
        out = q.astype(np.float32)
        with np.errstate(over="ignore"):  # a hostile scale may overflow to inf, as in the reference
            out *= np.repeat(scales, block)[:n]
        return out
    if spec.name == "topk":
        k = topk_count(spec, n)
        count = int(np.frombuffer(data, dtype="<u4", count=1)[0])
        if count != k:
            raise CodecError(f"topk payload says {count} values, but k is {k} for n = {n}")
        indices = np.frombuffer(data, dtype="<u4", count=k, offset=4).astype(np.int64)
        if k and (indices[-1] >= n or (k > 1 and not (np.diff(indices) > 0).all())):
            raise CodecError(f"topk indices must be strictly ascending and below {n}")
        out = np.zeros(n, dtype=np.float32)
        out[indices] = np.frombuffer(data, dtype="<f4", count=k, offset=4 + 4 * k)
        return out
    raise CodecError(f"unknown codec {spec.name!r}")


class TorchErrorFeedback:
    """shared.compress.ErrorFeedback for the trainer: the same float32 residual arithmetic, in torch."""

    def __init__(self, n: int):
        self.residual = torch.zeros(n, dtype=torch.float32)

    def encode(self, spec: CodecSpec, values: torch.Tensor) -> bytes:
        values = values.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if values.numel() != self.residual.numel():
            raise CodecError(f"error feedback holds {self.residual.numel()} values, got {values.numel()}")
        corrected = values + self.residual
        raw = _encode_raw(spec, corrected)
        self.residual = corrected - torch.from_numpy(_decode_raw(spec, raw, corrected.numel()))
        return pack(spec, raw)
