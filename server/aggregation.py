"""Fast aggregation rules for the coordinator: shared/aggregate.py's contracts over an (n, d) float32 matrix.

Each rule here must return what its reference in shared/aggregate.py returns (tests prove it on random
inputs); never change a rule's meaning here without changing the reference first.

Inputs are an (n, d) float32 numpy array or torch tensor (CPU), one row per update. Work goes column
chunk by column chunk so that one pass over memory does all of a rule's arithmetic and no temporary grows
with d: numpy sorts short rows fastest (so median and trimmed transpose a chunk and sort its rows), torch
multiplies matrices fastest (so Krum's Gram matrix is torch, in float64: a float32 Gram matrix picked the
wrong client at d = 10M). `values` comes back as a float32 torch tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from shared.aggregate import (
    CCLIP_DEFAULT_ITERATIONS,
    CCLIP_TAU_MEDIAN_MULTIPLE,
    KRUM_OUTLIER_SCORE_MULTIPLE,
    Aggregate,
    AggregationError,
    NonFiniteInputError,
    check_equal_weights,
    check_f,
    check_weights,
)

SORT_CHUNK_COLUMNS = 16_384

"""Columns sorted per step: a (16384, 32) float32 block stays in L2 cache."""

CLIP_CHUNK_COLUMNS = 1_024
"""Columns per centered-clipping step: the float64 differences of one chunk, n * 8 KiB, stay in L2 cache
(4096 columns ran 2x slower at n = 32, 16384 columns 6x)."""

GRAM_CHUNK_COLUMNS = 262_144
"""Columns per float64 Gram step; the float64 copy of one chunk is n * 2 MiB."""

Matrix = np.ndarray | torch.Tensor


def as_matrix(updates: Matrix | Sequence[Sequence[float]]) -> np.ndarray:
    """View updates as a C-contiguous (n, d) float32 numpy array (no copy when it already is one)."""
    if isinstance(updates, torch.Tensor):
        updates = updates.detach().cpu().numpy()
    matrix = np.ascontiguousarray(updates, dtype=np.float32)
    if matrix.ndim != 2:
        raise AggregationError(f"updates must be an (n, d) matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        raise AggregationError("no updates to aggregate")
    return matrix


def check_finite(matrix: np.ndarray) -> None:
    """Raise NonFiniteInputError naming the first update that holds NaN or infinity.

    A row sum is the cheap screen (one read of memory); finite values can still overflow a float32 sum,
    so a non-finite sum only marks the row for an exact look.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sums = matrix.sum(axis=1)
    for i in np.flatnonzero(~np.isfinite(sums)):
        bad = np.flatnonzero(~np.isfinite(matrix[i]))
        if bad.size:
            raise NonFiniteInputError(int(i), int(bad[0]))


def _result(values: np.ndarray, used, discarded) -> Aggregate:
    values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return Aggregate(values, sorted(int(i) for i in used), sorted(int(i) for i in discarded))


def _weighted_rows(matrix: np.ndarray, rows: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i over the chosen rows, one BLAS pass over them."""
    coefficients = np.array([weights[i] for i in rows], dtype=np.float64)
    coefficients /= coefficients.sum()
    chosen = torch.from_numpy(matrix[list(rows)] if len(rows) != matrix.shape[0] else matrix)
    return (torch.from_numpy(coefficients.astype(np.float32)) @ chosen).numpy()


def mean(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.mean: the weighted mean; tolerates no Byzantine input."""
    matrix = as_matrix(updates)
    check_finite(matrix)
    n = matrix.shape[0]
    w = check_weights(weights, n)
    check_f("mean", f, n, 1)
    return _result(_weighted_rows(matrix, range(n), w), range(n), [])


def _coordinate_wise(matrix: np.ndarray, f: int, keep: Callable[[np.ndarray], np.ndarray]):
    """Sort each coordinate once, chunk by chunk; `keep` maps sorted (w, n) rows to w values.

    The columns are split into one contiguous span per torch thread, sorted in threads (numpy releases the GIL while it
    sorts and compares). Returns (values, used, discarded) with shared.aggregate._coordinate_wise's trimming
    rule.
    """
    n, d = matrix.shape
    values = np.empty(d, dtype=np.float32)

    def sort_span(first: int, last: int) -> np.ndarray:
        trimmed = np.zeros(n, dtype=np.int64)
        block = np.empty((min(SORT_CHUNK_COLUMNS, last - first), n), dtype=np.float32)
        for start in range(first, last, SORT_CHUNK_COLUMNS):
            stop = min(start + SORT_CHUNK_COLUMNS, last)
            chunk = matrix[:, start:stop]
            rows = block[: stop - start]
            np.copyto(rows, chunk.T)
            rows.sort(axis=1)
            values[start:stop] = keep(rows)
            if f:
                low, high = rows[:, f].copy(), rows[:, n - f - 1].copy()  # contiguous: compared n times
                trimmed += np.count_nonzero((chunk < low) | (chunk > high), axis=1)
        return trimmed

    chunks = -(-d // SORT_CHUNK_COLUMNS)
    threads = max(1, min(torch.get_num_threads(), chunks))  # the same CPU budget torch's kernels use
    per_span = -(-chunks // threads) * SORT_CHUNK_COLUMNS
    spans = [(first, min(first + per_span, d)) for first in range(0, d, per_span)]
    if len(spans) == 1:
        trimmed = sort_span(*spans[0])
    else:
        with ThreadPoolExecutor(len(spans)) as pool:
            trimmed = sum(pool.map(lambda span: sort_span(*span), spans))
    threshold = d * (1 + 2 * f / n) / 2
    return values, np.flatnonzero(trimmed <= threshold), np.flatnonzero(trimmed > threshold)


def median(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.median: coordinate-wise median; n >= 2f + 1; equal weights only."""
    matrix = as_matrix(updates)
    check_finite(matrix)
    n = matrix.shape[0]
    check_equal_weights("median", weights, n)
    check_f("median", f, n, 2 * f + 1)

    def middle(rows: np.ndarray) -> np.ndarray:
        if n % 2:
            return rows[:, n // 2]
        return (rows[:, n // 2 - 1].astype(np.float64) + rows[:, n // 2]) / 2

    return _result(*_coordinate_wise(matrix, f, middle))


def trimmed_mean(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.trimmed_mean: drop the f lowest and highest per coordinate; n >= 2f + 1."""
    matrix = as_matrix(updates)
    check_finite(matrix)
    n = matrix.shape[0]
    check_equal_weights("trimmed", weights, n)
    check_f("trimmed", f, n, 2 * f + 1)

    def kept_mean(rows: np.ndarray) -> np.ndarray:
        return rows[:, f : n - f].sum(axis=1, dtype=np.float64) / (n - 2 * f)

    return _result(*_coordinate_wise(matrix, f, kept_mean))


def squared_distances(matrix: np.ndarray) -> np.ndarray:
    """(n, n) float64 squared Euclidean distances, from a Gram matrix accumulated in float64.

    Distances do not change when every row moves by the same vector, so each chunk is taken relative to
    row 0: that removes the component all updates share, which is what makes |a|^2 + |b|^2 - 2ab cancel.
    """
    n, d = matrix.shape
    source = torch.from_numpy(matrix)
    gram = torch.zeros(n, n, dtype=torch.float64)
    buffer = torch.empty(n, min(GRAM_CHUNK_COLUMNS, d), dtype=torch.float64)
    for start in range(0, d, GRAM_CHUNK_COLUMNS):
        stop = min(start + GRAM_CHUNK_COLUMNS, d)
        chunk = buffer[:, : stop - start]
        chunk.copy_(source[:, start:stop])
        chunk -= chunk[0].clone()
        gram.addmm_(chunk, chunk.T)
    norms = gram.diagonal()
    distances = (norms[:, None] + norms[None, :] - 2 * gram).clamp_(min=0)
    distances.fill_diagonal_(0)
    return distances.numpy()


def krum_scores(matrix: np.ndarray, f: int) -> np.ndarray:
    """shared.aggregate.krum_scores: sum of squared distances to the n - f - 2 nearest others."""
    n = matrix.shape[0]
    distances = squared_distances(matrix)
    others = np.sort(distances[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)
    return others[:, : n - f - 2].sum(axis=1)


def _krum_order(matrix: np.ndarray, f: int, rule: str) -> tuple[list[int], list[int]]:
    """shared.aggregate._krum_order: inputs best to worst, and the discarded ones."""
    n = matrix.shape[0]
    check_f(rule, f, n, 2 * f + 3)
    scores = krum_scores(matrix, f)
    # A stable sort breaks equal scores by index, as the reference does.
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    threshold = KRUM_OUTLIER_SCORE_MULTIPLE * float(np.median(scores))
    return order, [i for i in order[n - f :] if scores[i] > threshold]


def krum(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.krum: the input with the lowest Krum score; n >= 2f + 3; equal weights only."""
    matrix = as_matrix(updates)
    check_finite(matrix)
    check_equal_weights("krum", weights, matrix.shape[0])
    order, discarded = _krum_order(matrix, f, "krum")
    return _result(matrix[order[0]].copy(), [order[0]], discarded)


def multi_krum(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0, m: int | None = None) -> Aggregate:
    """shared.aggregate.multi_krum: weighted mean of the m lowest Krum scores (m defaults to n - f)."""
    matrix = as_matrix(updates)
    check_finite(matrix)
    n = matrix.shape[0]
    w = check_weights(weights, n)
    order, discarded = _krum_order(matrix, f, "multikrum")
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - f:
        raise AggregationError(f"multikrum's m must be an integer in [1, n - f] = [1, {n - f}], got {m!r}")
    chosen = sorted(order[:m])
    return _result(_weighted_rows(matrix, chosen, w), chosen, discarded)


def centered_clip(
    updates: Matrix,
    weights: Sequence[float] | None = None,
    f: int = 0,
    center: Matrix | Sequence[float] | None = None,
    tau: float | None = None,
    iterations: int = CCLIP_DEFAULT_ITERATIONS,
) -> Aggregate:
    """shared.aggregate.centered_clip, in float64 per chunk.

    Each step needs ||x_i - v|| over all of d before it can move v, but the norms for the next step can
    be summed chunk by chunk as each chunk of the new v is made; so L steps read the matrix L + 1 times.
    """
    matrix = as_matrix(updates)
    check_finite(matrix)
    n, d = matrix.shape
    w = np.array(check_weights(weights, n), dtype=np.float64)
    check_f("cclip", f, n, 2 * f + 1)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise AggregationError(f"cclip's iterations must be a positive integer, got {iterations!r}")
    if center is None:
        v = median(matrix).values.numpy().astype(np.float64)
    else:
        if isinstance(center, torch.Tensor):
            center = center.detach().cpu().numpy()
        v = np.array(center, dtype=np.float64).reshape(-1)
        if v.shape[0] != d:
            raise AggregationError(f"cclip's center has {v.shape[0]} values, the updates {d}")
        if not np.isfinite(v).all():
            raise AggregationError("cclip's center is not finite")

    squared = np.zeros(n)
    for start in range(0, d, CLIP_CHUNK_COLUMNS):
        differences = matrix[:, start : start + CLIP_CHUNK_COLUMNS] - v[start : start + CLIP_CHUNK_COLUMNS]
        squared += np.einsum("ij,ij->i", differences, differences)
    norms = np.sqrt(squared)
    if tau is None:
        tau = CCLIP_TAU_MEDIAN_MULTIPLE * float(np.median(norms))
    elif not (np.isfinite(tau) and tau >= 0):
        raise AggregationError(f"cclip's tau must be finite and >= 0, got {tau!r}")

    for _ in range(iterations):
        clipped = np.flatnonzero(norms > tau)
        scales = np.ones(n)
        scales[clipped] = tau / norms[clipped]
        coefficients = w * scales / w.sum()
        squared = np.zeros(n)
        for start in range(0, d, CLIP_CHUNK_COLUMNS):
            stop = min(start + CLIP_CHUNK_COLUMNS, d)
            differences = matrix[:, start:stop] - v[start:stop]
            step = coefficients @ differences
            v[start:stop] += step
            differences -= step  # now x_i - v for the new v, ready for the next step's norms
            squared += np.einsum("ij,ij->i", differences, differences)
        norms = np.sqrt(squared)
    return _result(v, np.setdiff1d(np.arange(n), clipped), clipped)


RULES: dict[str, Callable[..., Aggregate]] = {
    "mean": mean,
    "median": median,
    "trimmed": trimmed_mean,
    "krum": krum,
    "multikrum": multi_krum,
    "cclip": centered_clip,
}
"""Rule name -> fast rule; the same names, parameters and results as shared.aggregate.RULES."""
