"""The numba kernels behind server/aggregation/'s fast rules (that module's docstring says what each rule
does with them). Every kernel reads the (n, d) float32 matrix a panel of PANEL_COLUMNS columns at a time and
does its arithmetic while the panel is in cache; panels are grouped in GROUP_COLUMNS columns, the unit of
parallel work, and each group's partial sums are kept apart and added in group order by the caller, so that
results do not depend on the thread count. Run them through launch(), which gives them torch's thread budget.

Kernels compile on their first call (about 15 s for all of them on one core) and are cached on disk next to
this file (numba's cache=True); a cached start takes well under a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK_COLUMNS = 256
"""Columns the sorting network and the distance tiles work on at a time: a block's sort keys (n KiB) stay in
L1 cache through the network's ~100 passes, a block of float64 values (2n KiB) in L2 through the distance
tiles'. At n = 32, 128 columns were slower for both (loop overheads); 512 no faster."""

PANEL_COLUMNS = 2048
"""Columns read from the matrix at a time: n runs of 8 KiB, long enough for the hardware prefetchers (runs of
BLOCK_COLUMNS, 1 KiB, made the key copy 1.7x slower), while a panel and its sort keys (n * 16 KiB) are still
in cache for the second look that counting trimmed values or summing distances takes."""

GROUP_COLUMNS = 8 * PANEL_COLUMNS
"""Columns per unit of parallel work and per partial sum: 611 groups at d = 10M keep 16 threads evenly busy,
and the per-group partial distance matrices (n * n float64 each) take a few MiB."""

_KEY_OF_POSITIVE_INFINITY = 0x7F800000
_KEY_OF_NEGATIVE_INFINITY = -0x7F800001
"""Sort keys (see _sort_key) of +inf and -inf; every NaN's key lies outside them as well."""


# Sort keys: the float32's bits as an int32, with every bit but the sign flipped for negative floats, so
# that comparing keys as integers orders them as the floats (-0.0 just below +0.0). The network sorts keys
# because LLVM turned a float min/max written back in place into a compare and a masked store, 5x slower
# here; integer min and max are single instructions.
@intrinsic
def _sort_key(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.xor(bits, _flip_mask(builder, bits))

    return types.int32(types.float32), codegen


@intrinsic
def _key_value(typingctx, key):
    if key != types.int32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.xor(args[0], _flip_mask(builder, args[0]))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.int32), codegen


def _flip_mask(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """0x7FFFFFFF where the sign bit is set, else 0: (bits >> 31, arithmetic) >> 1, logical."""
    int32 = ir.IntType(32)
    return builder.lshr(builder.ashr(bits, ir.Constant(int32, 31)), ir.Constant(int32, 1))


def _odd_even_merge_sort(size: int) -> list[tuple[int, int, int]]:
    """Batcher's odd-even merge sort of `size` (a power of two) wires, in order: (low wire, high wire, p),
    where p is the length of the sorted runs that comparator's stage merges in pairs."""
    network = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        network.append((i + j, i + j + k, p))
            k //= 2
        p *= 2
    return network


@lru_cache(maxsize=256)
def sorting_network(n: int, exact: tuple[int, ...], pooled: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The comparators that sort n rows far enough for a rule: rows `exact` must hold their sorted values,
    rows pooled[0]..pooled[1] - 1 only the right values in some order (the trimmed mean sums them).

    Batcher's network is built for the next power of two and the comparators reaching past row n dropped:
    missing rows act as +inf, which no comparator moves. Then, last comparator first, a comparator is kept
    only if a row needed later reads it, or if it moves a value into or out of the pooled rows.

    Returns (pairs, presorted): the (k, 2) int64 row pairs left to run, and whether the kernel sorts each
    full group of 8 rows in registers first (done when those comparators are all kept; they are then not in
    `pairs`).
    """
    size = 1 << max(n - 1, 0).bit_length()
    network = [(a, b, p) for a, b, p in _odd_even_merge_sort(size) if b < n]
    first, last = pooled
    needed = set(exact)
    kept = []
    for a, b, p in reversed(network):
        if a in needed or b in needed or (first <= a < last) != (first <= b < last):
            kept.append((a, b, p))
            needed |= {a, b}
    kept.reverse()
    in_registers = {(a, b, p) for a, b, p in network if p < 8 and b < n // 8 * 8}
    presorted = bool(in_registers) and in_registers <= set(kept)
    pairs = [(a, b) for a, b, p in kept if not (presorted and (a, b, p) in in_registers)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), presorted


@njit(inline="always")
def _sort_eight(keys, offset, width):
    """Sort 8 rows of the key buffer column-wise, rows offset // PANEL_COLUMNS .. + 7 from column
    offset % PANEL_COLUMNS on: the 19 comparators of Batcher's network for 8 (the first three stages of the
    full network) in registers: 8 stores a column where running them as pairs takes 38.

    Inlined, with unsigned indices, so that LLVM sees that the rows lie a constant distance apart (numba
    wraps negative indices; with those selects in the addresses LLVM cannot prove the rows do not overlap,
    and does not vectorize).
    """
    p1 = np.uint64(PANEL_COLUMNS)
    p2, p3, p4 = p1 + p1, p1 + p1 + p1, p1 + p1 + p1 + p1
    p5, p6, p7 = p4 + p1, p4 + p2, p4 + p3
    first = np.uint64(offset)
    for c in range(width):
        i = first + np.uint64(c)
        x0, x1, x2, x3 = keys[i], keys[i + p1], keys[i + p2], keys[i + p3]
        x4, x5, x6, x7 = keys[i + p4], keys[i + p5], keys[i + p6], keys[i + p7]
        x0, x1 = min(x0, x1), max(x0, x1)
        x2, x3 = min(x2, x3), max(x2, x3)
        x4, x5 = min(x4, x5), max(x4, x5)
        x6, x7 = min(x6, x7), max(x6, x7)
        x0, x2 = min(x0, x2), max(x0, x2)
        x1, x3 = min(x1, x3), max(x1, x3)
        x4, x6 = min(x4, x6), max(x4, x6)
        x5, x7 = min(x5, x7), max(x5, x7)
        x1, x2 = min(x1, x2), max(x1, x2)
        x5, x6 = min(x5, x6), max(x5, x6)
        x0, x4 = min(x0, x4), max(x0, x4)
        x1, x5 = min(x1, x5), max(x1, x5)
        x2, x6 = min(x2, x6), max(x2, x6)
        x3, x7 = min(x3, x7), max(x3, x7)
        x2, x4 = min(x2, x4), max(x2, x4)
        x3, x5 = min(x3, x5), max(x3, x5)
        x1, x2 = min(x1, x2), max(x1, x2)
        x3, x4 = min(x3, x4), max(x3, x4)
        x5, x6 = min(x5, x6), max(x5, x6)
        keys[i], keys[i + p1], keys[i + p2], keys[i + p3] = x0, x1, x2, x3
        keys[i + p4], keys[i + p5], keys[i + p6], keys[i + p7] = x4, x5, x6, x7


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _count_outside(row, low, high):
    """How many of row[c] lie outside [low[c], high[c]]; summed in float32 (exact below 2^24, whatever the
    order) so that it vectorizes 8 wide."""
    total = np.float32(0)
    for c in range(row.size):
        total += np.float32(1) if (row[c] < low[c]) | (row[c] > high[c]) else np.float32(0)
    return np.int64(total)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _squared_distance(row, center):
    """sum (row - center)^2 in float64; reassociated so that it vectorizes (a float64 sum in any order is
    within rounding of the reference's exact sum)."""
    total = 0.0
    for c in range(row.size):
        difference = np.float64(row[c]) - center[c]
        total += difference * difference
    return total


@njit(cache=True, nogil=True, parallel=True)
def coordinate_kernel(matrix, pairs, presorted, f, trimmed, values, center, counts, squared, finite):
    """Sort every column (as far as `pairs` goes) and write the median or the trimmed mean to `values`.

    With f, counts[g, i] counts the columns of group g where row i lies outside sorted rows f..n-f-1. With a
    non-empty `center` (the median only), also writes the median there in float64 and the squared distances
    of the rows from it to squared[g]. finite[g] says whether group g's inputs were all finite.
    """
    n, d = matrix.shape
    p = PANEL_COLUMNS
    full = n // 8 * 8 if presorted else 0
    middle = n // 2
    for g in prange(finite.size):
        keys = np.empty(n * p, dtype=np.int32)
        low = np.empty(BLOCK_COLUMNS, dtype=np.float32)
        high = np.empty(BLOCK_COLUMNS, dtype=np.float32)
        kept = np.empty(BLOCK_COLUMNS, dtype=np.float64)
        lowest = np.int32(0)
        highest = np.int32(0)
        for panel in range(g * GROUP_COLUMNS, min(d, (g + 1) * GROUP_COLUMNS), p):
            for i in range(n):
                row = matrix[i, panel : min(panel + p, d)]
                out = keys[i * p : i * p + row.size]
                for c in range(row.size):
                    key = _sort_key(row[c])
                    out[c] = key
                    lowest = min(lowest, key)
                    highest = max(highest, key)

            for offset in range(0, min(p, d - panel), BLOCK_COLUMNS):
                start = panel + offset
                width = min(BLOCK_COLUMNS, d - start)
                for r in range(0, full, 8):
                    _sort_eight(keys, r * p + offset, width)
                for k in range(pairs.shape[0]):
                    a = keys[pairs[k, 0] * p + offset : pairs[k, 0] * p + offset + width]
                    b = keys[pairs[k, 1] * p + offset : pairs[k, 1] * p + offset + width]
                    for c in range(width):
                        x = a[c]
                        y = b[c]
                        a[c] = min(x, y)
                        b[c] = max(x, y)

                out = values[start : start + width]
                if trimmed:
                    kept[:width] = 0.0
                    for r in range(f, n - f - 3, 4):  # four rows a pass, as in weighted_sum_kernel
                        k0 = keys[r * p + offset : r * p + offset + width]
                        k1 = keys[(r + 1) * p + offset : (r + 1) * p + offset + width]
                        k2 = keys[(r + 2) * p + offset : (r + 2) * p + offset + width]
                        k3 = keys[(r + 3) * p + offset : (r + 3) * p + offset + width]
                        for c in range(width):
                            kept[c] += (np.float64(_key_value(k0[c])) + np.float64(_key_value(k1[c]))) + (
                                np.float64(_key_value(k2[c])) + np.float64(_key_value(k3[c])))
                    for r in range(f + (n - 2 * f) // 4 * 4, n - f):
                        sorted_row = keys[r * p + offset : r * p + offset + width]
                        for c in range(width):
                            kept[c] += np.float64(_key_value(sorted_row[c]))
                    for c in range(width):
                        out[c] = np.float32(kept[c] / (n - 2 * f))
                elif n % 2:
                    sorted_row = keys[middle * p + offset : middle * p + offset + width]
                    for c in range(width):
                        out[c] = _key_value(sorted_row[c])
                        kept[c] = np.float64(out[c])
                else:
                    below = keys[(middle - 1) * p + offset : (middle - 1) * p + offset + width]
                    above = keys[middle * p + offset : middle * p + offset + width]
                    for c in range(width):
                        kept[c] = (np.float64(_key_value(below[c])) + np.float64(_key_value(above[c]))) / 2
                        out[c] = np.float32(kept[c])

                if f:
                    lowest_kept = keys[f * p + offset : f * p + offset + width]
                    highest_kept = keys[(n - f - 1) * p + offset : (n - f - 1) * p + offset + width]
                    for c in range(width):
                        low[c] = _key_value(lowest_kept[c])
                        high[c] = _key_value(highest_kept[c])
                    for i in range(n):
                        counts[g, i] += _count_outside(matrix[i, start : start + width], low[:width], high[:width])
                if center.size:
                    here = center[start : start + width]
                    here[:] = kept[:width]
                    for i in range(n):
                        squared[g, i] += _squared_distance(matrix[i, start : start + width], here)
        finite[g] = lowest > _KEY_OF_NEGATIVE_INFINITY and highest < _KEY_OF_POSITIVE_INFINITY


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _distance_tile(block, a, b, width, squared):
    """squared[a:a+2, b:b+4] += squared distances of block rows a, a+1 from rows b..b+3 over `width` columns.

    Eight sums at once: each value loaded serves 2 or 4 differences, and eight vector accumulators
    (reassociated so that they vectorize) keep the floating-point units busy without spilling registers.
    """
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
    x0, x1 = block[a], block[a + 1]
    y0, y1, y2, y3 = block[b], block[b + 1], block[b + 2], block[b + 3]
    for c in range(width):
        t00 = x0[c] - y0[c]
        t01 = x0[c] - y1[c]
        t02 = x0[c] - y2[c]
        t03 = x0[c] - y3[c]
        t10 = x1[c] - y0[c]
        t11 = x1[c] - y1[c]
        t12 = x1[c] - y2[c]
        t13 = x1[c] - y3[c]
        s00 += t00 * t00
        s01 += t01 * t01
        s02 += t02 * t02
        s03 += t03 * t03
        s10 += t10 * t10
        s11 += t11 * t11
        s12 += t12 * t12
        s13 += t13 * t13
    squared[a, b] += s00
    squared[a, b + 1] += s01
    squared[a, b + 2] += s02
    squared[a, b + 3] += s03
    squared[a + 1, b] += s10
    squared[a + 1, b + 1] += s11
    squared[a + 1, b + 2] += s12
    squared[a + 1, b + 3] += s13


@njit(cache=True, nogil=True, parallel=True)
def pairwise_distance_kernel(matrix, partial):
    """partial[g, a, b] += ||matrix[a] - matrix[b]||^2 over group g's columns, in float64, for a < b (and
    some a >= b: the tiles on the diagonal); partial is (groups, m, m) with m = n rounded up to 4."""
    n, d = matrix.shape
    m = partial.shape[1]
    for g in prange(partial.shape[0]):
        block = np.zeros((m, BLOCK_COLUMNS), dtype=np.float64)  # rows n..m-1 stay zero
        squared = partial[g]
        for start in range(g * GROUP_COLUMNS, min(d, (g + 1) * GROUP_COLUMNS), BLOCK_COLUMNS):
            width = min(BLOCK_COLUMNS, d - start)
            for i in range(n):
                row = matrix[i, start : start + width]
                out = block[i]
                for c in range(width):
                    out[c] = np.float64(row[c])
            for a in range(0, m, 2):
                for b in range(a // 4 * 4, m, 4):
                    _distance_tile(block, a, b, width, squared)


@njit(cache=True, nogil=True, parallel=True)
def weighted_sum_kernel(matrix, rows, weights, total_weight, values, finite):
    """values = sum_k weights[k] * matrix[rows[k]] / total_weight, summed in float64 as the reference sums
    (then exact for small integers). finite[g] is False where a sum was not finite: a non-finite input makes
    one so, and so would weights near 1e270 (the reference's sums overflow as well then)."""
    d = matrix.shape[1]
    for g in prange(finite.size):
        total = np.empty(PANEL_COLUMNS, dtype=np.float64)
        probe = np.zeros(PANEL_COLUMNS, dtype=np.float64)  # stays 0 while every sum is finite, else NaN
        for start in range(g * GROUP_COLUMNS, min(d, (g + 1) * GROUP_COLUMNS), PANEL_COLUMNS):
            width = min(PANEL_COLUMNS, d - start)
            total[:width] = 0.0
            for k in range(0, rows.size - 3, 4):  # four rows a pass: a quarter of the loads and stores of total
                c0, c1, c2, c3 = weights[k], weights[k + 1], weights[k + 2], weights[k + 3]
                x0, x1 = matrix[rows[k], start : start + width], matrix[rows[k + 1], start : start + width]
                x2, x3 = matrix[rows[k + 2], start : start + width], matrix[rows[k + 3], start : start + width]
                for c in range(width):
                    total[c] += (c0 * np.float64(x0[c]) + c1 * np.float64(x1[c])) + (
                        c2 * np.float64(x2[c]) + c3 * np.float64(x3[c]))
            for k in range(rows.size // 4 * 4, rows.size):
                weight = weights[k]
                x = matrix[rows[k], start : start + width]
                for c in range(width):
                    total[c] += weight * np.float64(x[c])
            for c in range(width):
                values[start + c] = np.float32(total[c] / total_weight)
                probe[c] += total[c] - total[c]
        finite[g] = True
        for c in range(PANEL_COLUMNS):
            if probe[c] != 0:
                finite[g] = False


@njit(cache=True, nogil=True, parallel=True)
def clip_step_kernel(matrix, coefficients, center, squared):
    """center += sum_i coefficients[i] * (matrix[i] - center), in float64; then, unless squared has no
    rows, squared[g, i] = ||matrix[i] - center||^2 over group g for the moved center."""
    n, d = matrix.shape
    for g in prange((d + GROUP_COLUMNS - 1) // GROUP_COLUMNS):
        step = np.empty(PANEL_COLUMNS, dtype=np.float64)
        for start in range(g * GROUP_COLUMNS, min(d, (g + 1) * GROUP_COLUMNS), PANEL_COLUMNS):
            width = min(PANEL_COLUMNS, d - start)
            here = center[start : start + width]
            step[:width] = 0.0
            for i in range(0, n - 3, 4):  # four rows a pass, as in weighted_sum_kernel
                c0, c1, c2, c3 = coefficients[i], coefficients[i + 1], coefficients[i + 2], coefficients[i + 3]
                x0, x1 = matrix[i, start : start + width], matrix[i + 1, start : start + width]
                x2, x3 = matrix[i + 2, start : start + width], matrix[i + 3, start : start + width]
                for c in range(width):
                    v = here[c]
                    step[c] += (c0 * (np.float64(x0[c]) - v) + c1 * (np.float64(x1[c]) - v)) + (
                        c2 * (np.float64(x2[c]) - v) + c3 * (np.float64(x3[c]) - v))
            for i in range(n // 4 * 4, n):
                coefficient = coefficients[i]
                x = matrix[i, start : start + width]
                for c in range(width):
                    step[c] += coefficient * (np.float64(x[c]) - here[c])
            for c in range(width):
                here[c] += step[c]
            if squared.shape[0]:  # the panel is still in cache
                for i in range(n):
                    squared[g, i] += _squared_distance(matrix[i, start : start + width], here)


@njit(cache=True, nogil=True, parallel=True)
def distance_kernel(matrix, center, squared):
    """squared[g, i] = ||matrix[i] - center||^2 over group g, in float64."""
    n, d = matrix.shape
    for g in prange(squared.shape[0]):
        for start in range(g * GROUP_COLUMNS, min(d, (g + 1) * GROUP_COLUMNS), PANEL_COLUMNS):
            here = center[start : min(start + PANEL_COLUMNS, d)]
            for i in range(n):
                squared[g, i] += _squared_distance(matrix[i, start : start + here.size], here)


_LAUNCH = threading.Lock()


def launch(kernel: Callable[..., object], *args: object) -> None:
    """Run a parallel kernel on torch's thread count, the CPU budget the rest of the coordinator uses.

    numba's thread count is per calling thread, so it is set at every launch. One kernel runs at a time:
    numba's fallback threading layer (workqueue) aborts the process on concurrent launches, and a kernel
    already uses every thread it is given. numba's OpenMP layer, starting, sets the OpenMP thread count that
    torch shares to all the cores; the budget is put back.
    """
    with _LAUNCH:
        budget = torch.get_num_threads()
        numba.set_num_threads(max(1, min(budget, numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)
        if torch.get_num_threads() != budget:
            torch.set_num_threads(budget)


def groups(d: int) -> int:
    return -(-d // GROUP_COLUMNS)
