"""Aggregation rules for pseudo-gradients, as pure-Python references that state each rule's contract.

The coordinator runs fast numpy/torch versions (server/aggregation/); tests prove they equal these.
Never mutate the inputs, and never aggregate an input that is not finite.

Every rule has one call signature, ``rule(updates, weights=None, f=0, **params) -> Aggregate``:

- ``updates``: n sequences of d floats (float32 values, as decoded from the wire).
- ``weights``: one positive finite weight per update, or None for equal weights. Rules that give every
  input an equal say by design (median, trimmed, krum) accept only equal weights, because a Byzantine
  sender could otherwise claim a huge weight; they raise AggregationError on unequal ones.
- ``f``: how many of the n inputs may be Byzantine. Each rule states the n it needs for that f.

Distances and sums are computed in Python floats (float64). Ties are broken by input index, lowest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CCLIP_DEFAULT_ITERATIONS = 3
"""Centered clipping's L when the job does not set one; Karimireddy et al. find 1 to 3 enough."""

CCLIP_TAU_MEDIAN_MULTIPLE = 2.0
"""Default clipping radius, as a multiple of the median distance from the starting center. Honest
updates in high dimension sit at nearly the same distance, so twice the median leaves them unclipped."""

KRUM_OUTLIER_SCORE_MULTIPLE = 2.0
"""Krum reports an input discarded only when its score is this many times the median score: honest inputs
score alike, and reporting Krum's f worst regardless would lower honest reputations every round."""


class AggregationError(ValueError):
    """The inputs cannot be aggregated by this rule (empty, ragged, too few for the f it must tolerate)."""


class NonFiniteInputError(AggregationError):
    """An update holds NaN or infinity; it is rejected before any rule sees it. `index` names the update."""

    def __init__(self, index: int, position: int):
        super().__init__(f"update {index} is not finite at position {position}; drop it and aggregate the rest")
        self.index = index
        self.position = position


@dataclass(frozen=True)
class Aggregate:
    """What a rule returns.

    values: the aggregate, d floats (a torch tensor on the fast path, a list here).
    used: sorted indices of the inputs the aggregate rests on: all but the discarded for mean, median,
        trimmed and cclip; the chosen one (krum) or m (multikrum) for Krum.
    discarded: sorted indices of the inputs the rule judged outliers and discarded or down-weighted;
        the coordinator lowers their senders' reputations. `used` and `discarded` are disjoint; an input
        may be in neither (Krum's honest runners-up are not used, yet not judged outliers).
    """

    values: Sequence[float]
    used: list[int]
    discarded: list[int]


Rule = Callable[..., Aggregate]


def check_updates(updates: Sequence[Sequence[float]]) -> int:
    """Return d after checking that updates are non-empty, equally long and finite (NonFiniteInputError)."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    d = len(updates[0])
    for i, u in enumerate(updates):
        if len(u) != d:
            raise AggregationError(f"update {i} has {len(u)} values, update 0 has {d}")
        for j, x in enumerate(u):
            if not math.isfinite(x):
                raise NonFiniteInputError(i, j)
    return d


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Return n weights (1.0 each when None) after checking they are positive and finite."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise AggregationError(f"got {len(w)} weights for {n} updates; give one per update")
    for i, x in enumerate(w):
        if not (math.isfinite(x) and x > 0):
            raise AggregationError(f"weight {i} is {x}; weights must be positive and finite")
    return w


def check_equal_weights(rule: str, weights: Sequence[float] | None, n: int) -> None:
    w = check_weights(weights, n)
    if any(x != w[0] for x in w):
        raise AggregationError(f"{rule} gives every update an equal say; it accepts no unequal weights")


def check_f(rule: str, f: int, n: int, minimum_n: int) -> None:
    """Raise unless f is a non-negative int and n >= minimum_n (the rule's requirement for that f)."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise AggregationError(f"f must be a non-negative integer, got {f!r}")
    if n < minimum_n:
        raise AggregationError(f"{rule} with f={f} needs at least {minimum_n} updates, got {n}")


def mean(updates: Sequence[Sequence[float]], weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """Weighted mean, sum_i w_i x_i / sum_i w_i. Tolerates no Byzantine input: one bad update moves it
    arbitrarily far. `f` is accepted so that every rule shares one signature; the guarantee holds for f = 0.
    Every input is used, none discarded.
    """
    d = check_updates(updates)
    w = check_weights(weights, len(updates))
    check_f("mean", f, len(updates), 1)
    total = math.fsum(w)
    values = [math.fsum(wi * u[j] for wi, u in zip(w, updates)) / total for j in range(d)]
    return Aggregate(values, list(range(len(updates))), [])


def _coordinate_wise(updates: Sequence[Sequence[float]], f: int, keep: Callable[[list[float]], float]):
    """Sort each coordinate once; return (values, used, discarded) for a rule keeping the middle n - 2f.

    An input counts as trimmed at a coordinate when its value lies strictly outside the kept middle's
    range, so equal values are never told apart by their index. An input is discarded when it is trimmed
    at more coordinates than halfway between chance (2f/n, what an honest input like the others sees)
    and always.
    """
    n, d = len(updates), len(updates[0])
    trimmed = [0] * n
    values = []
    for j in range(d):
        column = sorted(u[j] for u in updates)
        values.append(keep(column))
        if f:
            low, high = column[f], column[n - f - 1]
            for i, u in enumerate(updates):
                if u[j] < low or u[j] > high:
                    trimmed[i] += 1
    threshold = d * (1 + 2 * f / n) / 2
    discarded = [i for i in range(n) if trimmed[i] > threshold]
    used = [i for i in range(n) if trimmed[i] <= threshold]
    return values, used, discarded


def median(updates: Sequence[Sequence[float]], weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """Coordinate-wise median (the mean of the two middle values when n is even).

    Tolerates f Byzantine inputs when n >= 2f + 1. Equal weights only. `f` also sets which inputs are
    reported discarded: those outside the f lowest..f highest range at most coordinates (see
    _coordinate_wise); with f = 0 none is.
    """
    d = check_updates(updates)
    n = len(updates)
    check_equal_weights("median", weights, n)
    check_f("median", f, n, 2 * f + 1)

    def middle(column: list[float]) -> float:
        if n % 2:
            return column[n // 2]
        return (column[n // 2 - 1] + column[n // 2]) / 2

    values, used, discarded = _coordinate_wise(updates, f, middle)
    return Aggregate(values, used, discarded)


def trimmed_mean(updates: Sequence[Sequence[float]], weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """Coordinate-wise trimmed mean: per coordinate, drop the f lowest and f highest values, average the
    n - 2f left. Tolerates f Byzantine inputs when n >= 2f + 1. Equal weights only. Inputs trimmed at most
    coordinates are reported discarded (see _coordinate_wise); with f = 0 it is the mean.
    """
    check_updates(updates)
    n = len(updates)
    check_equal_weights("trimmed", weights, n)
    check_f("trimmed", f, n, 2 * f + 1)
    values, used, discarded = _coordinate_wise(updates, f, lambda column: math.fsum(column[f : n - f]) / (n - 2 * f))
    return Aggregate(values, used, discarded)


def krum_scores(updates: Sequence[Sequence[float]], f: int) -> list[float]:
    """Krum's score of each input: the sum of its squared distances to its n - f - 2 nearest others."""
    n = len(updates)
    squared = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            squared[a][b] = squared[b][a] = math.fsum((x - y) * (x - y) for x, y in zip(updates[a], updates[b]))
    nearest = n - f - 2
    return [math.fsum(sorted(squared[a][b] for b in range(n) if b != a)[:nearest]) for a in range(n)]


def _krum_order(updates: Sequence[Sequence[float]], f: int, rule: str) -> tuple[list[int], list[int]]:
    """Inputs from best to worst Krum score (ties to the lower index), and the discarded ones: those among
    the f worst whose score exceeds KRUM_OUTLIER_SCORE_MULTIPLE times the median score."""
    n = len(updates)
    check_f(rule, f, n, 2 * f + 3)
    scores = krum_scores(updates, f)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    ranked = sorted(scores)
    middle = ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2
    return order, sorted(i for i in order[n - f :] if scores[i] > KRUM_OUTLIER_SCORE_MULTIPLE * middle)


def krum(updates: Sequence[Sequence[float]], weights: Sequence[float] | None = None, f: int = 0) -> Aggregate:
    """Krum (Blanchard et al. 2017): the single input with the lowest score (krum_scores), ties to the
    lowest index. Tolerates f Byzantine inputs and needs n >= 2f + 3, else AggregationError. Equal
    weights only. Used: the chosen input. Discarded: those of the f highest scores that exceed
    KRUM_OUTLIER_SCORE_MULTIPLE times the median score.
    """
    check_updates(updates)
    check_equal_weights("krum", weights, len(updates))
    order, discarded = _krum_order(updates, f, "krum")
    return Aggregate([float(x) for x in updates[order[0]]], [order[0]], discarded)


def multi_krum(
    updates: Sequence[Sequence[float]], weights: Sequence[float] | None = None, f: int = 0, m: int | None = None
) -> Aggregate:
    """Multi-Krum (El Mhamdi et al. 2018): the weighted mean of the m inputs with the lowest Krum scores
    (m defaults to n - f; 1 <= m <= n - f). Tolerates f Byzantine inputs and needs n >= 2f + 3. Used: the
    m chosen. Discarded: as for krum.
    """
    d = check_updates(updates)
    n = len(updates)
    w = check_weights(weights, n)
    order, discarded = _krum_order(updates, f, "multikrum")
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - f:
        raise AggregationError(f"multikrum's m must be an integer in [1, n - f] = [1, {n - f}], got {m!r}")
    chosen = sorted(order[:m])
    total = math.fsum(w[i] for i in chosen)
    values = [math.fsum(w[i] * updates[i][j] for i in chosen) / total for j in range(d)]
    return Aggregate(values, chosen, discarded)


def _norm(u: Sequence[float], v: Sequence[float]) -> float:
    return math.sqrt(math.fsum((x - y) * (x - y) for x, y in zip(u, v)))


def centered_clip(
    updates: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
    f: int = 0,
    center: Sequence[float] | None = None,
    tau: float | None = None,
    iterations: int = CCLIP_DEFAULT_ITERATIONS,
) -> Aggregate:
    """Centered clipping (Karimireddy, He and Jaggi 2021), L = `iterations` steps of

        v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i,    clip(z, tau) = z * min(1, tau / ||z||)

    starting from `center` (the previous round's aggregate, say), or from the coordinate-wise median when
    None. `tau` defaults to CCLIP_TAU_MEDIAN_MULTIPLE times the median of ||x_i - v|| at the start. Each
    input moves v by at most tau, so f Byzantine inputs shift it by at most tau f / n per step; it needs
    n >= 2f + 1. Weights are allowed. Discarded: inputs clipped (||x_i - v|| > tau) in the last step;
    used: the others.
    """
    d = check_updates(updates)
    n = len(updates)
    w = check_weights(weights, n)
    check_f("cclip", f, n, 2 * f + 1)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise AggregationError(f"cclip's iterations must be a positive integer, got {iterations!r}")
    if center is None:
        v = [float(x) for x in median(updates).values]
    else:
        if len(center) != d:
            raise AggregationError(f"cclip's center has {len(center)} values, the updates {d}")
        if not all(math.isfinite(x) for x in center):
            raise AggregationError("cclip's center is not finite")
        v = [float(x) for x in center]
    if tau is None:
        distances = sorted(_norm(u, v) for u in updates)
        middle = distances[n // 2] if n % 2 else (distances[n // 2 - 1] + distances[n // 2]) / 2
        tau = CCLIP_TAU_MEDIAN_MULTIPLE * middle
    elif not (math.isfinite(tau) and tau >= 0):
        raise AggregationError(f"cclip's tau must be finite and >= 0, got {tau!r}")
    total = math.fsum(w)
    clipped: list[int] = []
    for _ in range(iterations):
        norms = [_norm(u, v) for u in updates]
        scales = [1.0 if r <= tau else tau / r for r in norms]
        clipped = [i for i in range(n) if norms[i] > tau]
        v = [v[j] + math.fsum(w[i] * scales[i] * (updates[i][j] - v[j]) for i in range(n)) / total for j in range(d)]
    return Aggregate(v, [i for i in range(n) if i not in clipped], clipped)


RULES: dict[str, Rule] = {
    "mean": mean,
    "median": median,
    "trimmed": trimmed_mean,
    "krum": krum,
    "multikrum": multi_krum,
    "cclip": centered_clip,
}
"""Rule name (as a job's config and governance name it) -> reference rule. Same names in server/aggregation/."""
