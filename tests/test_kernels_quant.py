"""kernels/quant.py, the int8 blockwise rule that every codec matches byte for byte, behaves as its docstring says.

Pure Python: no GPU needed. The GPU kernel's agreement with this reference is in test_kernels_parity.py.
"""

from __future__ import annotations

import math
import random
from array import array
from fractions import Fraction

import pytest

from kernels.quant import (
    MIN_BLOCK_AMAX,
    QUANT_BLOCK_SIZE,
    block_scale,
    dequantize_int8,
    quantize_int8,
    quantize_value,
    to_float32,
)


def exact_code(x: float, amax: float) -> int:
    """round-half-away-from-zero(127 x / amax) in exact rational arithmetic."""
    r = Fraction(127) * Fraction(x) / Fraction(amax)
    magnitude = math.floor(abs(r) + Fraction(1, 2))
    return -magnitude if r < 0 else magnitude


def test_halves_round_away_from_zero():
    scales, codes = quantize_int8([127.0, 2.5, -2.5, 0.5, -0.5, 0.49999997])
    assert list(array("b", codes)) == [127, 3, -3, 1, -1, 0]
    assert scales[0] == 1.0


def test_scale_is_float32_of_amax_over_127():
    for amax in (1.0, 3.0, 1e-3, 123456.7, 2.0**-99):
        amax = to_float32(amax)
        assert block_scale(amax) == to_float32(float(Fraction(amax) / 127))


def test_blocks_below_the_threshold_are_zero_blocks():
    tiny = to_float32(MIN_BLOCK_AMAX / 2)
    scales, codes = quantize_int8([tiny, -tiny] + [0.0] * 10)
    assert list(scales) == [0.0]
    assert codes == bytes(12)


def test_float64_recipe_equals_the_exact_rule():
    rng = random.Random(0)
    for _ in range(20_000):
        amax = to_float32(abs(rng.gauss(0, 10.0 ** rng.randint(-30, 30))) + MIN_BLOCK_AMAX)
        x = to_float32(amax * rng.uniform(-1, 1))
        assert quantize_value(x, amax) == exact_code(x, amax)
    for k in range(-127, 127):  # exact half-integers, where the rounding direction matters
        x = to_float32((k + 0.5) * 3.0 / 127)
        assert quantize_value(x, 3.0) == exact_code(x, 3.0)


def test_blocks_are_256_values_and_the_last_may_be_short():
    scales, codes = quantize_int8([1.0] * QUANT_BLOCK_SIZE + [2.0] * 10)
    assert len(scales) == 2 and len(codes) == QUANT_BLOCK_SIZE + 10
    assert list(array("b", codes))[-1] == 127


def test_round_trip_error_is_at_most_half_a_scale_step():
    rng = random.Random(1)
    values = array("f", (rng.gauss(0, 1e-3) for _ in range(1000)))
    scales, codes = quantize_int8(values)
    decoded = dequantize_int8(scales, codes)
    for i, (x, y) in enumerate(zip(values, decoded)):
        assert abs(x - y) <= scales[i // QUANT_BLOCK_SIZE] * 0.5000001


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8([1.0, math.nan])


def test_dequantize_refuses_a_wrong_number_of_scales():
    with pytest.raises(ValueError, match="scales"):
        dequantize_int8(array("f", [1.0, 1.0]), bytes(10))
