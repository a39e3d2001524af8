"""Fast aggregation rules for the coordinator: shared/aggregate.py's contracts over an (n, d) float32 matrix.

Each rule here must return what its reference in shared/aggregate.py returns (tests prove it on random
inputs); never change a rule's meaning here without changing the reference first.

Inputs are an (n, d) float32 numpy array or torch tensor (CPU), one row per update; `values` comes back as a
float32 torch tensor. The work is done by numba kernels (compiled, vectorized, multi-threaded loops) that read
the matrix once per pass, a panel of PANEL_COLUMNS columns at a time, and do all of a rule's arithmetic on a
panel while it is in cache, so that no temporary grows with d:

- median and trimmed mean turn a panel into integer sort keys (aggregation_kernels._sort_key) and sort
  each block of BLOCK_COLUMNS columns down the columns with a sorting network: Batcher's odd-even merge
  sort, cut to the comparators that the rows the rule reads depend on. A comparator is a min and a max of
  two rows of keys, a loop the compiler vectorizes, where a sort per column branches on every comparison.
  The first three stages (sorting each group of 8 rows) run in registers.
- Krum's distances are summed squared differences of each pair of updates, in float64 register tiles (see
  squared_distances).
- centered clipping gets its start (the median) and the distances from it in one pass, then each step's
  move and the next step's distances in one pass more.
- the weighted means (mean, multi-Krum's average) are one pass, summed in float64.

Panels are grouped in GROUP_COLUMNS columns, the unit of parallel work. Kernels use as many threads as torch
does (the coordinator's CPU budget), and each group's partial sums are kept apart and added in group order,
so results do not depend on the thread count. The kernels check finiteness as they read, and fall back on
check_finite to name a bad input; as in the references, a non-finite input is reported before a bad
argument.

The kernels live in server/aggregation/kernels.py; they compile on their first call (about 15 s for all of
them on one core) and are cached on disk (numba's cache=True).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from server.aggregation import kernels
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


@contextmanager
def _arguments(matrix: np.ndarray) -> Iterator[None]:
    """Wrap a rule's argument checks: the references check finiteness first, so an argument error is
    raised only after check_finite found every input finite (the kernels check finiteness later)."""
    try:
        yield
    except AggregationError:
        check_finite(matrix)
        raise


def _result(values: np.ndarray, used, discarded) -> Aggregate:
    values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return Aggregate(values, sorted(int(i) for i in used), sorted(int(i) for i in discarded))


def _weighted_rows(matrix: np.ndarray, rows: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i over the chosen rows, in float64 per value; checks those rows are finite."""
    chosen = np.array([weights[i] for i in rows], dtype=np.float64)
    values = np.empty(matrix.shape[1], dtype=np.float32)
    finite = np.empty(kernels.groups(matrix.shape[1]), dtype=np.bool_)
    kernels.launch(kernels.weighted_sum_kernel, matrix, np.array(rows, dtype=np.int64), chosen, chosen.sum(), values, finite)
    if not finite.all():
        check_finite(matrix)
    return values


def mean(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.mean: the weighted mean; tolerates no Byzantine input."""
    matrix = as_matrix(updates)
    n = matrix.shape[0]
    with _arguments(matrix):
        w = check_weights(weights, n)
        check_f("mean", f, n, 1)
    return _result(_weighted_rows(matrix, range(n), w), range(n), [])


def _coordinate_wise(
    matrix: np.ndarray, f: int, trimmed: bool, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Sort each coordinate as far as the rule needs; return (values, used, discarded, distances), values
    being the median or the trimmed mean, used and discarded by shared.aggregate._coordinate_wise's rule.

    With `center` (an empty float64 d-vector; the median only), also fills it with the median in float64
    and returns each row's distance from it; distances is None otherwise.
    """
    n, d = matrix.shape
    exact = set() if trimmed else {(n - 1) // 2, n // 2}
    if f:
        exact |= {f, n - f - 1}  # the bounds that count a row as trimmed
    pairs, presorted = kernels.sorting_network(n, tuple(sorted(exact)), (f, n - f) if trimmed else (0, 0))
    groups = kernels.groups(d)
    values = np.empty(d, dtype=np.float32)
    counts = np.zeros((groups, n), dtype=np.int64)
    squared = np.zeros((groups if center is not None else 0, n), dtype=np.float64)
    finite = np.empty(groups, dtype=np.bool_)
    target = np.empty(0, dtype=np.float64) if center is None else center
    kernels.launch(kernels.coordinate_kernel, matrix, pairs, presorted, f, trimmed, values, target, counts, squared, finite)
    if not finite.all():
        check_finite(matrix)
    trimmed_counts = counts.sum(axis=0)
    threshold = d * (1 + 2 * f / n) / 2
    used, discarded = np.flatnonzero(trimmed_counts <= threshold), np.flatnonzero(trimmed_counts > threshold)
    return values, used, discarded, np.sqrt(squared.sum(axis=0)) if center is not None else None


def median(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.median: coordinate-wise median; n >= 2f + 1; equal weights only."""
    matrix = as_matrix(updates)
    n = matrix.shape[0]
    with _arguments(matrix):
        check_equal_weights("median", weights, n)
        check_f("median", f, n, 2 * f + 1)
    values, used, discarded, _ = _coordinate_wise(matrix, f, trimmed=False)
    return _result(values, used, discarded)


def trimmed_mean(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.trimmed_mean: drop the f lowest and highest per coordinate; n >= 2f + 1."""
    matrix = as_matrix(updates)
    n = matrix.shape[0]
    with _arguments(matrix):
        check_equal_weights("trimmed", weights, n)
        check_f("trimmed", f, n, 2 * f + 1)
    if f == 0:  # nothing is trimmed: the mean, with no sorting
        return _result(_weighted_rows(matrix, range(n), [1.0] * n), range(n), [])
    values, used, discarded, _ = _coordinate_wise(matrix, f, trimmed=True)
    return _result(values, used, discarded)


def squared_distances(matrix: np.ndarray) -> np.ndarray:
    """(n, n) float64 squared Euclidean distances between the rows; checks the inputs are finite.

    Each distance sums its own squared differences, in float64, in which the difference of two float32
    values is exact (unless one is over 2^29 times the other, and then it is rounded once). A Gram matrix,
    |a|^2 + |b|^2 - 2ab, loses about float64 epsilon times |a|^2 + |b|^2 to cancellation, so it was taken
    relative to row 0; but updates are stacked in arrival order, and a first update 1e8 times the others
    cancelled every honest distance to nothing: Krum picked an outlier. Here no input changes the accuracy
    of a distance between two others.

    The differences are multiplied out in register tiles of 2 x 4 rows, as the Gram matrix was. On one core
    of an AVX-512 EPYC (n = 16, 32 and 64, d = 4M) they took within 3% of the time of the Gram tiles relative
    to row 0: the subtractions go to the floating-point adders, beside the FMA units. A Gram matrix relative
    to the coordinate-wise median, which no minority of rows can move either, took 18% to 33% longer at
    n = 32 and 64, for the sorting network that finds the median. On cores whose adders are the FMA units
    (Intel's before Golden Cove) the subtractions compete with the FMAs: not measured yet.
    Earlier, at n = 32, d = 10M: torch's float64 addmm over 262144-column chunks took 1.9 s, numpy's float64
    syrk 1.2 s, and a float32 torch Gram matrix per 8192-column chunk added up in float64 0.66 s (but it is
    only as accurate as float32 rounding, 1e-8 to 1e-7, where the tests hold Krum's scores to 1e-9).
    """
    n, d = matrix.shape
    m = -(-n // 4) * 4
    partial = np.zeros((kernels.groups(d), m, m), dtype=np.float64)
    kernels.launch(kernels.pairwise_distance_kernel, matrix, partial)
    upper = np.triu(partial.sum(axis=0), 1)[:n, :n]
    distances = upper + upper.T
    # A non-finite input makes its row of distances inf or NaN; a lone row has no distances to show it.
    if n == 1 or not np.isfinite(distances).all():
        check_finite(matrix)
    return distances


def krum_scores(matrix: np.ndarray, f: int) -> np.ndarray:
    """shared.aggregate.krum_scores: sum of squared distances to the n - f - 2 nearest others."""
    n = matrix.shape[0]
    distances = squared_distances(matrix)
    others = np.sort(distances[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)
    return others[:, : n - f - 2].sum(axis=1)


def _krum_order(matrix: np.ndarray, f: int) -> tuple[list[int], list[int]]:
    """shared.aggregate._krum_order: inputs best to worst, and the discarded ones."""
    n = matrix.shape[0]
    scores = krum_scores(matrix, f)
    # A stable sort breaks equal scores by index, as the reference does.
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    threshold = KRUM_OUTLIER_SCORE_MULTIPLE * float(np.median(scores))
    return order, [i for i in order[n - f :] if scores[i] > threshold]


def krum(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """shared.aggregate.krum: the input with the lowest Krum score; n >= 2f + 3; equal weights only."""
    matrix = as_matrix(updates)
    n = matrix.shape[0]
    with _arguments(matrix):
        check_equal_weights("krum", weights, n)
        check_f("krum", f, n, 2 * f + 3)
    order, discarded = _krum_order(matrix, f)
    return _result(matrix[order[0]].copy(), [order[0]], discarded)


def multi_krum(updates: Matrix, weights: Sequence[float] | None = None, f: int = 0, m: int | None = None) -> Aggregate:
    """shared.aggregate.multi_krum: weighted mean of the m lowest Krum scores (m defaults to n - f)."""
    matrix = as_matrix(updates)
    n = matrix.shape[0]
    with _arguments(matrix):
        w = check_weights(weights, n)
        check_f("multikrum", f, n, 2 * f + 3)
    order, discarded = _krum_order(matrix, f)
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
    """shared.aggregate.centered_clip, in float64.

    Each step needs ||x_i - v|| over all of d before it can move v, but the distances for the next step are
    summed panel by panel as each panel of the new v is made, and the median start (in float64, as the
    reference's) comes with its distances. So L steps read the matrix L + 1 times.
    """
    matrix = as_matrix(updates)
    n, d = matrix.shape
    with _arguments(matrix):
        w = np.array(check_weights(weights, n), dtype=np.float64)
        check_f("cclip", f, n, 2 * f + 1)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise AggregationError(f"cclip's iterations must be a positive integer, got {iterations!r}")
        if center is None:
            v = np.empty(d, dtype=np.float64)  # the median, below
        else:
            if isinstance(center, torch.Tensor):
                center = center.detach().cpu().numpy()
            v = np.array(center, dtype=np.float64).reshape(-1)
            if v.shape[0] != d:
                raise AggregationError(f"cclip's center has {v.shape[0]} values, the updates {d}")
            if not np.isfinite(v).all():
                raise AggregationError("cclip's center is not finite")
    if center is None:
        *_, norms = _coordinate_wise(matrix, 0, trimmed=False, center=v)
    else:
        squared = np.zeros((kernels.groups(d), n), dtype=np.float64)
        kernels.launch(kernels.distance_kernel, matrix, v, squared)
        norms = np.sqrt(squared.sum(axis=0))
        if not np.isfinite(norms).all():  # a non-finite input, or finite ones far beyond float32's range
            check_finite(matrix)
    if tau is None:
        tau = CCLIP_TAU_MEDIAN_MULTIPLE * float(np.median(norms))
    elif not (np.isfinite(tau) and tau >= 0):
        raise AggregationError(f"cclip's tau must be finite and >= 0, got {tau!r}")

    for step in range(iterations):
        clipped = np.flatnonzero(norms > tau)
        scales = np.ones(n)
        scales[clipped] = tau / norms[clipped]
        coefficients = w * scales / w.sum()
        last = step == iterations - 1  # the last step's distances are not needed
        squared = np.zeros((0 if last else kernels.groups(d), n), dtype=np.float64)
        kernels.launch(kernels.clip_step_kernel, matrix, coefficients, v, squared)
        norms = np.sqrt(squared.sum(axis=0))
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
