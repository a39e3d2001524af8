"""The int8 blockwise codec for pseudo-gradients: the exact rule, and a pure-Python reference of it.

This docstring is the specification that the WGSL kernel (quantize.wgsl), numpy and torch codecs must match
byte for byte. Never change the rule here without changing every codec and its agreement test.

The rule, for float32 values x[0..n) (finite; in practice x = float32(theta_global - theta_local)):

* Blocks: consecutive runs of QUANT_BLOCK_SIZE = 256 values; the last block may be shorter.
* amax = max |x| over the block (exact: a float32).
* If amax < 2^-100 (MIN_BLOCK_AMAX), the block is a zero block: scale = 0.0 and every code is 0.
  The threshold sits far above the subnormals that a GPU may flush to zero, so flushing never changes a byte.
* Otherwise scale = float32(amax / 127), the exact quotient rounded to the nearest float32, ties to even
  (in float64: `float32(float64(amax) / 127.0)`; double rounding is harmless for division).
* code = round_half_away_from_zero(127 * x / amax), using the EXACT real quotient (not x / scale),
  clamped to [-127, 127] (the clamp never binds since |x| <= amax). In float64 this is
  `r = 127.0 * float64(x) / float64(amax); code = sign(r) * floor(|r| + 0.5)`: 127*x is exact in float64
  and no exact quotient lies within float64 rounding of a half-integer unless it is one, so this is exact.
* Encoded: codes as int8 (two's complement bytes), one byte per value, n bytes; scales as little-endian
  float32, one per block, ceil(n / 256) of them. How the two are laid out on the wire is the wire codec's job.
* Decoding: value = float32(code * scale), one correctly rounded float32 product.

Why integer-exact rounding instead of x / scale: WGSL's division is only accurate to 2.5 ulp, so a GPU cannot
reproduce a correctly rounded x / scale; the exact comparison 127|x| vs (q +- 1/2) amax it can do in u32.
"""

from __future__ import annotations

import math
import struct
from array import array

QUANT_BLOCK_SIZE = 256
QUANT_MAX_CODE = 127
MIN_BLOCK_AMAX = 2.0**-100


def to_float32(value: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), returned as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def block_scale(amax: float) -> float:
    """The float32 scale of a block whose largest magnitude is `amax` (0.0 for a zero block)."""
    if amax < MIN_BLOCK_AMAX:
        return 0.0
    return to_float32(amax / QUANT_MAX_CODE)


def quantize_value(x: float, amax: float) -> int:
    """The int8 code of float32 `x` in a block with largest magnitude `amax`: round-half-away(127 x / amax)."""
    if amax < MIN_BLOCK_AMAX or x == 0.0:
        return 0
    r = QUANT_MAX_CODE * x / amax  # exact enough: see the module docstring
    magnitude = min(math.floor(abs(r) + 0.5), QUANT_MAX_CODE)
    return -magnitude if r < 0 else magnitude


def quantize_int8(values) -> tuple[array, bytes]:
    """Encode float32 values (array('f'), memoryview of float32, or floats) as (scales array('f'), codes bytes)."""
    values = values if isinstance(values, array) and values.typecode == "f" else array("f", values)
    for x in values:
        if not math.isfinite(x):
            raise ValueError(f"cannot quantise a non-finite value ({x}); the pseudo-gradient has diverged")
    scales = array("f")
    codes = bytearray(len(values))
    for start in range(0, len(values), QUANT_BLOCK_SIZE):
        block = values[start : start + QUANT_BLOCK_SIZE]
        amax = max(abs(x) for x in block)
        scales.append(block_scale(amax))
        for i, x in enumerate(block):
            codes[start + i] = quantize_value(x, amax) & 0xFF
    return scales, bytes(codes)


def dequantize_int8(scales, codes: bytes) -> array:
    """Decode (scales, codes) back to float32 values: float32(code * scale)."""
    n = len(codes)
    expected_blocks = -(-n // QUANT_BLOCK_SIZE)
    if len(scales) != expected_blocks:
        raise ValueError(f"{n} codes need {expected_blocks} scales, got {len(scales)}")
    signed = array("b", codes)
    return array("f", (to_float32(q * scales[i // QUANT_BLOCK_SIZE]) for i, q in enumerate(signed)))
