"""Fast codecs: torch encoders for the trainer and numpy decoders for the coordinator.

They implement shared/compress.py's spec (its module docstring) byte for byte; tests prove it. Never change
the wire format here, and never let a decoder allocate more than spec and n allow.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.compress import (INT8_LEVELS, INT8_MIN_BLOCK_AMAX, SPARSELOCO_BITS, CodecError, CodecSpec,
                             SparseLoCoLayout, encoded_size, int8_block, pack, sparseloco_layout, sparseloco_ranks,
                             topk_count, unpack)


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


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """shared.compress._pack_bits: `width`-bit values as one little-endian bitstream, zero-padded to a byte."""
    bits = (values.astype(np.uint32)[:, None] >> np.arange(width, dtype=np.uint32)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int, width: int, what: str) -> np.ndarray:
    """_pack_bits' inverse for `count` values (int64); raises CodecError when a padding bit is set."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[count * width :].any():
        raise CodecError(f"sparseloco {what} stream has padding bits set after its last value")
    return bits[: count * width].reshape(count, width).astype(np.int64) @ (1 << np.arange(width, dtype=np.int64))


def _chunk_counts(layout: SparseLoCoLayout) -> np.ndarray:
    """k_c of every chunk."""
    kept = np.full(layout.chunks, layout.k, dtype=np.int64)
    if layout.chunks:
        kept[-1] = layout.kept(layout.chunks - 1)
    return kept


def _sparseloco_encode(values: torch.Tensor, layout: SparseLoCoLayout) -> bytes:
    """The spec's ranking as one top-k over unique integer keys: the magnitude's float32 bits, then the offset
    reversed, so that a larger key is a larger |x| or, at equal |x|, the lower index (no tie left to chance)."""
    if layout.chunks == 0:
        return b""
    n, size, b = layout.n, layout.chunk, layout.index_bits
    offsets = torch.arange(n, dtype=torch.int64) % size
    magnitude_bits = values.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    keys = torch.full((layout.chunks * size,), -1, dtype=torch.int64)  # padding ranks below every value
    keys[:n] = (magnitude_bits << b) | (size - 1 - offsets)
    top = torch.topk(keys.view(layout.chunks, size), layout.k, dim=1, sorted=True).values  # rank order
    kept = torch.from_numpy(_chunk_counts(layout))
    high, hi_rank, lo_rank = torch.tensor([sparseloco_ranks(int(k)) for k in kept]).unbind(1)
    ranks = torch.arange(layout.k)[None, :]
    sent = ranks < kept[:, None]  # the last chunk may send fewer than K
    levels = (top >> b).to(torch.int32).view(torch.float32)
    level_pairs = torch.stack([levels.gather(1, hi_rank[:, None])[:, 0], levels.gather(1, lo_rank[:, None])[:, 0]], 1)
    offset = torch.where(sent, size - 1 - (top & ((1 << b) - 1)), size)  # unsent ranks sort after every offset
    index = (torch.arange(layout.chunks)[:, None] * size + offset).clamp_(max=n - 1)
    codes = (values[index] < 0).to(torch.int64) | ((ranks < high[:, None]).to(torch.int64) << 1)
    offset, order = torch.sort(offset, dim=1)
    codes = codes.gather(1, order)
    return (level_pairs.numpy().astype("<f4").tobytes() + _pack_bits(offset[sent].numpy(), b)
            + _pack_bits(codes[sent].numpy(), SPARSELOCO_BITS))


def _sparseloco_decode(data: bytes, layout: SparseLoCoLayout) -> np.ndarray:
    levels = np.frombuffer(data, dtype="<f4", count=2 * layout.chunks).astype(np.float32).reshape(-1, 2)
    hi, lo = levels[:, 0], levels[:, 1]
    kept = _chunk_counts(layout)
    high = kept // 2  # sparseloco_ranks' h
    bad = np.flatnonzero(~(np.isfinite(hi) & (hi >= lo) & (lo >= 0) & ((high > 0) | (hi == lo))))
    if bad.size:
        c = bad[0]
        raise CodecError(f"sparseloco chunk {c} has levels ({hi[c]}, {lo[c]}); they are finite, hi >= lo >= 0, "
                         f"and equal when no value is high")
    start = layout.level_bytes
    offsets = _unpack_bits(data[start : start + layout.index_bytes], layout.selected, layout.index_bits, "offset")
    codes = _unpack_bits(data[start + layout.index_bytes :], layout.selected, SPARSELOCO_BITS, "code")
    chunk_of = np.repeat(np.arange(layout.chunks), kept)
    lengths = np.minimum(layout.chunk, layout.n - np.arange(layout.chunks) * layout.chunk)
    same_chunk = chunk_of[1:] == chunk_of[:-1]
    if (offsets >= lengths[chunk_of]).any() or (np.diff(offsets)[same_chunk] <= 0).any():
        raise CodecError("sparseloco offsets must be strictly ascending within each chunk and below its length")
    highs = np.bincount(chunk_of, weights=codes >> 1, minlength=layout.chunks)
    bad = np.flatnonzero(highs != high)
    if bad.size:
        c = bad[0]
        raise CodecError(f"sparseloco chunk {c} marks {int(highs[c])} values high; its {kept[c]} values have {high[c]}")
    values = np.where(codes & 2, hi[chunk_of], lo[chunk_of])
    out = np.zeros(layout.n, dtype=np.float32)
    out[chunk_of * layout.chunk + offsets] = np.where(codes & 1, -values, values)
    return out


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
    if spec.name == "sparseloco":
        return _sparseloco_encode(values, sparseloco_layout(spec, values.numel()))
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
    if spec.name == "sparseloco":
        return _sparseloco_decode(data, sparseloco_layout(spec, n))
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
