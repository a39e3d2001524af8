"""Token ids as shards and batches carry them: little-endian unsigned integers, one byte each for a vocabulary of at
most 256 (bytes, every job before BPE) and two bytes each (uint16) above it, up to MAX_VOCAB.

The width is never guessed from the data: it follows from the job's vocab_size, which every node learns with the
job. Standard library only: the torch trainer, the simulator and the browser (Pyodide) all read shards with it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

BYTE_VOCAB = 256  # a vocabulary this size or smaller travels one byte per token
MAX_VOCAB = 65_536  # two bytes per token at most: a larger vocabulary would need a wider wire format


class TokenError(ValueError):
    """Token data that does not fit the job's vocabulary (a wrong width, or an id past the vocabulary)."""


def token_width(vocab_size: int) -> int:
    """Bytes per token id for a vocabulary of `vocab_size`: 1 up to BYTE_VOCAB, else 2 (up to MAX_VOCAB)."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise TokenError(f"vocab_size must lie in 1..{MAX_VOCAB} (ids travel as at most two bytes), got {vocab_size}")
    return 1 if vocab_size <= BYTE_VOCAB else 2


def read_tokens(data: bytes, vocab_size: int) -> bytes | array:
    """A shard's ids: `data` itself (bytes) for a byte vocabulary, else an array('H') of the little-endian uint16
    ids. Either has len() = the token count and slices that b"".join packs back into the wire format (on a
    little-endian host: every WebGPU host). Raises TokenError for a ragged length or an id >= vocab_size."""
    width = token_width(vocab_size)
    if width == 1:
        ids = bytes(data)
    else:
        if len(data) % 2:
            raise TokenError(f"{len(data)} bytes is not a whole number of 2-byte token ids (vocab {vocab_size})")
        ids = array("H")
        ids.frombytes(bytes(data))
        if sys.byteorder == "big":
            ids.byteswap()
    if vocab_size < (1 << (8 * width)) and ids and max(ids) >= vocab_size:
        raise TokenError(f"token id {max(ids)} is outside the vocabulary of {vocab_size}")
    return ids


def write_tokens(ids: Iterable[int], vocab_size: int) -> bytes:
    """`ids` in the wire format of a `vocab_size` vocabulary (read_tokens' inverse); TokenError for an id outside it."""
    width = token_width(vocab_size)
    packed = array("B" if width == 1 else "H")
    try:
        packed.extend(ids)
    except OverflowError:
        raise TokenError(f"a token id does not fit in {width} byte(s) (vocab {vocab_size})") from None
    if packed and max(packed) >= vocab_size:
        raise TokenError(f"token id {max(packed)} is outside the vocabulary of {vocab_size}")
    if width == 2 and sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()
