"""server/aggregation/'s fast rules return what shared/aggregate.py's references return."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server import aggregation as fast
from server.aggregation import kernels
from shared import aggregate as reference
from shared.aggregate import AggregationError, NonFiniteInputError

# Krum's rules need n >= 2f + 3; every rule here gets the largest f that the rule and n allow.
MINIMUM_N = {"mean": lambda f: 1, "median": lambda f: 2 * f + 1, "trimmed": lambda f: 2 * f + 1,
             "krum": lambda f: 2 * f + 3, "multikrum": lambda f: 2 * f + 3, "cclip": lambda f: 2 * f + 1}


def largest_f(name: str, n: int) -> int:
    if name == "mean":
        return 0
    return max((f for f in range(n) if MINIMUM_N[name](f) <= n), default=-1)


@st.composite
def integer_matrices(draw, min_n=1):
    """Small integer values: every distance and sum is exact in float32 and float64 alike, and ties are
    common, so the fast rules must pick, trim and discard exactly the inputs the references do."""
    n = draw(st.integers(min_n, 9))
    d = draw(st.integers(1, 6))
    values = draw(st.lists(st.integers(-8, 8), min_size=n * d, max_size=n * d))
    return np.array(values, dtype=np.float32).reshape(n, d)


@st.composite
def float_matrices(draw, min_n=1):
    n = draw(st.integers(min_n, 9))
    d = draw(st.integers(1, 6))
    element = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    values = draw(st.lists(element, min_size=n * d, max_size=n * d))
    return np.array(values, dtype=np.float32).reshape(n, d)


def assert_values_close(fast_values: torch.Tensor, reference_values, matrix: np.ndarray):
    # A float32 result of sums of n float32 terms: a few float32 ulps of the largest input.
    tolerance = 4 * matrix.shape[0] * float(np.finfo(np.float32).eps) * (1 + float(np.abs(matrix).max()))
    np.testing.assert_allclose(fast_values.numpy(), np.array(reference_values), rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", sorted(reference.RULES))
@settings(max_examples=40, deadline=None)
@given(matrix=integer_matrices(min_n=3))
def test_fast_rule_equals_reference_on_integer_inputs(name, matrix):
    f = largest_f(name, matrix.shape[0])
    if f < 0:
        return
    expected = reference.RULES[name](matrix.tolist(), f=f)
    got = fast.RULES[name](matrix, f=f)
    assert (got.used, got.discarded) == (expected.used, expected.discarded)
    assert_values_close(got.values, expected.values, matrix)


@pytest.mark.parametrize("name", ["mean", "median", "trimmed", "cclip"])
@settings(max_examples=40, deadline=None)
@given(matrix=float_matrices(), data=st.data())
def test_fast_rule_equals_reference_on_float_inputs(name, matrix, data):
    f = data.draw(st.integers(0, largest_f(name, matrix.shape[0])), label="f")
    expected = reference.RULES[name](matrix.tolist(), f=f)
    got = fast.RULES[name](matrix, f=f)
    assert_values_close(got.values, expected.values, matrix)
    if name != "cclip":  # cclip's clip decisions can flip on a rounding at ||x - v|| == tau
        assert (got.used, got.discarded) == (expected.used, expected.discarded)


@settings(max_examples=40, deadline=None)
@given(matrix=float_matrices(min_n=3), data=st.data())
def test_fast_krum_scores_equal_reference_scores(matrix, data):
    f = data.draw(st.integers(0, (matrix.shape[0] - 3) // 2), label="f")
    expected = reference.krum_scores(matrix.tolist(), f)
    tolerance = 1e-9 * (1 + float((matrix.astype(np.float64) ** 2).sum()))
    np.testing.assert_allclose(fast.krum_scores(matrix, f), expected, rtol=1e-9, atol=tolerance)


@settings(max_examples=40, deadline=None)
@given(matrix=float_matrices(min_n=3), data=st.data())
def test_fast_krum_picks_an_input_with_the_best_reference_score(matrix, data):
    # On floats two scores may tie up to rounding, and then either input is a correct answer.
    f = data.draw(st.integers(0, (matrix.shape[0] - 3) // 2), label="f")
    scores = reference.krum_scores(matrix.tolist(), f)
    got = fast.krum(matrix, f=f)
    assert scores[got.used[0]] <= min(scores) * (1 + 1e-9) + 1e-9
    assert np.array_equal(got.values.numpy(), matrix[got.used[0]])


@pytest.mark.parametrize("name", sorted(fast.RULES))
def test_fast_rule_rejects_a_nan_input_naming_its_index(name):
    matrix = np.ones((5, 1000), dtype=np.float32)
    matrix[3, 517] = math.nan
    with pytest.raises(NonFiniteInputError, match="update 3 ") as caught:
        fast.RULES[name](matrix, f=1 if name != "mean" else 0)
    assert (caught.value.index, caught.value.position) == (3, 517)


def test_finite_values_whose_sum_overflows_float32_are_accepted():
    matrix = np.full((3, 4), 3e38, dtype=np.float32)
    assert fast.mean(matrix).values.tolist() == pytest.approx([3e38] * 4, rel=1e-6)


@pytest.mark.parametrize("name", sorted(fast.RULES))
def test_fast_rule_on_all_equal_inputs_returns_that_input_and_discards_none(name):
    row = np.linspace(-3, 5, 40_000, dtype=np.float32)
    result = fast.RULES[name](np.tile(row, (7, 1)), f=2 if name != "mean" else 0)
    np.testing.assert_allclose(result.values.numpy(), row, rtol=1e-6, atol=1e-6)
    assert result.discarded == []


def test_fast_krum_accepts_n_equal_2f_plus_3_and_rejects_one_fewer():
    matrix = np.arange(5, dtype=np.float32).reshape(5, 1) ** 2
    assert fast.krum(matrix, f=1).used == reference.krum(matrix.tolist(), f=1).used
    with pytest.raises(AggregationError, match="needs at least 5 updates, got 4"):
        fast.krum(matrix[:4], f=1)


def test_fast_krum_picks_the_right_input_under_a_large_shared_offset():
    # Pseudo-gradients share a large common part; |a|^2 + |b|^2 - 2ab in float32 loses their differences.
    generator = np.random.default_rng(5)
    d = 200_000
    matrix = (1000.0 + generator.normal(0, 1e-2, (7, d))).astype(np.float32)
    matrix[4] = (1000.0 + generator.normal(0, 0.7e-2, d)).astype(np.float32)  # the most central
    naive = torch.from_numpy(matrix) @ torch.from_numpy(matrix).T
    norms = naive.diagonal()
    assert fast.krum(matrix, f=2).used == [4]
    assert (norms[:, None] + norms[None, :] - 2 * naive).min() < 0  # the float32 Gram matrix is useless here


@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_fast_krum_is_not_steered_by_a_huge_first_update(name):
    # Updates are stacked in arrival order, so the first sender owns row 0; distances taken relative to
    # row 0 cancelled to nothing here, and Krum picked the 1e6 outlier.
    matrix = np.array([[1e30], [1e6], [0], [0.1], [-0.1], [0.2], [-0.2]], dtype=np.float32)
    expected = reference.RULES[name](matrix.tolist(), f=2)
    got = fast.RULES[name](matrix, f=2)
    assert (got.used, got.discarded) == (expected.used, expected.discarded)
    assert expected.discarded == [0, 1]


@pytest.mark.parametrize("d", [1, 1000])
@pytest.mark.parametrize("magnitude", [1e8, 1e12, 1e20, 1e30])
@pytest.mark.parametrize("huge_rows", [(0,), (4,), (0, 4)], ids=["first", "middle", "first-and-middle"])
@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_fast_krum_keeps_and_discards_the_reference_rows_beside_huge_updates(name, huge_rows, magnitude, d):
    # Honest updates of size 1 beside attackers' updates `magnitude` times larger, wherever they arrive: the
    # honest distances must survive the attackers' magnitude, so the same rows are picked and discarded.
    # Fewer attackers than f, so that multi-Krum must also rank honest rows to leave the worst of them out.
    n, f = 9, 3
    generator = np.random.default_rng(len(huge_rows) * 1000 + d)
    matrix = generator.normal(size=(n, d)).astype(np.float32)
    for i in huge_rows:
        matrix[i] = (magnitude * (1 + generator.random(d))).astype(np.float32)
    expected = reference.RULES[name](matrix.tolist(), f=f)
    got = fast.RULES[name](matrix, f=f)
    assert (got.used, got.discarded) == (expected.used, expected.discarded)
    assert set(huge_rows) <= set(expected.discarded)
    if name == "krum":
        assert np.array_equal(got.values.numpy(), matrix[got.used[0]])


def test_fast_rules_take_torch_tensors_as_well_as_numpy_arrays():
    matrix = np.random.default_rng(0).normal(size=(7, 300)).astype(np.float32)
    for name, rule in fast.RULES.items():
        from_numpy = rule(matrix, f=2 if name != "mean" else 0)
        from_torch = rule(torch.from_numpy(matrix), f=2 if name != "mean" else 0)
        assert torch.equal(from_numpy.values, from_torch.values)
        assert (from_numpy.used, from_numpy.discarded) == (from_torch.used, from_torch.discarded)


def test_fast_rules_chunk_long_updates_like_short_ones():
    # Longer than a group of columns, so block, panel and group seams are crossed; counts add across groups.
    generator = np.random.default_rng(1)
    d = kernels.GROUP_COLUMNS + 3
    matrix = generator.normal(size=(7, d)).astype(np.float32)
    matrix[5] -= 50
    matrix[6] += 50
    for name in ("median", "trimmed", "krum", "multikrum", "cclip"):
        assert fast.RULES[name](matrix, f=2).discarded == [5, 6]


def test_fast_weighted_mean_matches_reference():
    matrix = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert fast.mean(matrix, [1.0, 3.0]).values.tolist() == [2.5, 3.5]


def test_fast_centered_clip_from_a_given_center_matches_reference():
    matrix = np.array([[0.0], [0.0], [1000.0]], dtype=np.float32)
    expected = reference.centered_clip(matrix.tolist(), center=[1.0], tau=2.0, iterations=2)
    got = fast.centered_clip(matrix, center=torch.tensor([1.0]), tau=2.0, iterations=2)
    assert got.values.tolist() == pytest.approx(expected.values)
    assert (got.used, got.discarded) == (expected.used, expected.discarded) == ([0, 1], [2])


@pytest.mark.parametrize("name", ["mean", "multikrum", "cclip"])
@settings(max_examples=30, deadline=None)
@given(matrix=integer_matrices(min_n=3), data=st.data())
def test_fast_weighted_rule_equals_reference(name, matrix, data):
    n = matrix.shape[0]
    weights = data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n), label="weights")
    f = largest_f(name, n)
    expected = reference.RULES[name](matrix.tolist(), weights=weights, f=f)
    got = fast.RULES[name](matrix, weights=weights, f=f)
    assert (got.used, got.discarded) == (expected.used, expected.discarded)
    assert_values_close(got.values, expected.values, matrix)


# Sizes around the sorting network's power of two and its groups of 8 rows, and sizes that are neither.
AWKWARD_N = [3, 5, 7, 8, 9, 16, 31, 33, 64, 100]


def f_values(n: int, minimum_n) -> list[int]:
    largest = max(f for f in range(n) if minimum_n(f) <= n)
    return sorted({0, 1, largest // 2, largest} & set(range(largest + 1)))


@pytest.mark.parametrize("n", AWKWARD_N)
@pytest.mark.parametrize("d", [1, 7, 300])  # 300: one full sorting block and a partial one
@pytest.mark.parametrize("name", ["median", "trimmed"])
def test_fast_coordinate_wise_rules_equal_reference_exactly_for_any_n(name, n, d):
    # Small integers: many ties, and every median and trimmed mean is exact in float64, so the float32
    # values must equal the reference's rounded to float32, and the counts behind used/discarded must match.
    generator = np.random.default_rng(n * 1000 + d)
    matrix = generator.integers(-3, 4, size=(n, d)).astype(np.float32)
    matrix[generator.random(n) < 0.2] += 50  # outliers, so some inputs are discarded
    for f in f_values(n, MINIMUM_N[name]):
        expected = reference.RULES[name](matrix.tolist(), f=f)
        got = fast.RULES[name](matrix, f=f)
        assert (got.used, got.discarded) == (expected.used, expected.discarded), f
        np.testing.assert_array_equal(got.values.numpy(), np.array(expected.values, dtype=np.float32))


@pytest.mark.parametrize("n", [5, 8, 31, 33])
@pytest.mark.parametrize("name", ["median", "trimmed", "cclip"])
def test_fast_coordinate_wise_rules_equal_reference_on_floats_for_any_n(name, n):
    generator = np.random.default_rng(n)
    matrix = generator.normal(size=(n, 300)).astype(np.float32)
    matrix[: n // 4] *= 30
    for f in f_values(n, MINIMUM_N[name]):
        expected = reference.RULES[name](matrix.tolist(), f=f)
        got = fast.RULES[name](matrix, f=f)
        assert (got.used, got.discarded) == (expected.used, expected.discarded), f
        assert_values_close(got.values, expected.values, matrix)


@pytest.mark.parametrize("name", ["median", "trimmed"])
def test_fast_trimming_counts_decide_at_the_threshold_as_the_reference(name):
    # Input 5 is trimmed at exactly floor(threshold) coordinates, input 6 at one more: 5 is used, 6 is
    # discarded. d spans several column groups, so the counts must add up across them to the last one.
    n, f, d = 7, 2, 2 * kernels.GROUP_COLUMNS + 300
    threshold = d * (1 + 2 * f / n) / 2
    matrix = np.zeros((n, d), dtype=np.float32)
    matrix[5, : math.floor(threshold)] = 100
    matrix[6, : math.floor(threshold) + 1] = 100
    expected = reference.RULES[name](matrix.tolist(), f=f)
    got = fast.RULES[name](matrix, f=f)
    assert (got.used, got.discarded) == (expected.used, expected.discarded) == ([0, 1, 2, 3, 4, 5], [6])


@pytest.mark.parametrize("name", ["median", "trimmed"])
def test_fast_coordinate_wise_rules_treat_signed_zeros_as_equal(name):
    # The sort orders -0.0 below +0.0; an input must still not count as trimmed for being -0.0 against a
    # bound of +0.0, as the reference's float comparisons see them equal.
    generator = np.random.default_rng(3)
    matrix = np.where(generator.random((9, 400)) < 0.5, -0.0, 0.0).astype(np.float32)
    matrix[:, ::7] = generator.integers(-1, 2, size=(9, len(range(0, 400, 7))))
    for f in range(5):
        expected = reference.RULES[name](matrix.tolist(), f=f)
        got = fast.RULES[name](matrix, f=f)
        assert (got.used, got.discarded) == (expected.used, expected.discarded), f
        np.testing.assert_array_equal(got.values.numpy(), np.array(expected.values, dtype=np.float32))


@pytest.mark.parametrize("name", ["median", "trimmed", "cclip"])
def test_fast_coordinate_wise_rules_on_the_extremes_of_float32(name):
    biggest = float(np.finfo(np.float32).max)
    tiniest = float(np.finfo(np.float32).smallest_subnormal)
    column = [biggest, -biggest, tiniest, -tiniest, 0.0, -0.0, 1.0, biggest]
    matrix = np.array([column[i:] + column[:i] for i in range(8)], dtype=np.float32).T.copy()  # (8, 8)
    expected = reference.RULES[name](matrix.tolist(), f=2)
    got = fast.RULES[name](matrix, f=2)
    assert (got.used, got.discarded) == (expected.used, expected.discarded)
    np.testing.assert_array_equal(got.values.numpy(), np.array(expected.values, dtype=np.float32))


@pytest.mark.parametrize("n", AWKWARD_N)
def test_fast_krum_scores_equal_reference_for_any_n(n):
    # The distances are summed in tiles of 2 x 4 rows; n need not be a multiple of either.
    generator = np.random.default_rng(n)
    matrix = (10 + generator.normal(size=(n, 12))).astype(np.float32)
    f = (n - 3) // 2
    expected = reference.krum_scores(matrix.tolist(), f)
    np.testing.assert_allclose(fast.krum_scores(matrix, f), expected, rtol=1e-9)
    got = fast.multi_krum(matrix, f=f)
    wanted = reference.multi_krum(matrix.tolist(), f=f)
    assert (got.used, got.discarded) == (wanted.used, wanted.discarded)


@pytest.mark.parametrize("name", sorted(fast.RULES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fast_rule_finds_a_non_finite_value_in_the_last_partial_block(name, bad):
    d = kernels.GROUP_COLUMNS + 300
    matrix = np.ones((7, d), dtype=np.float32)
    matrix[4, d - 1] = bad
    with pytest.raises(NonFiniteInputError, match="update 4 ") as caught:
        fast.RULES[name](matrix, f=2 if name != "mean" else 0)
    assert (caught.value.index, caught.value.position) == (4, d - 1)


@pytest.mark.parametrize("name", sorted(fast.RULES))
def test_fast_rule_reports_a_non_finite_input_before_a_bad_argument(name):
    # As the references do: they check the updates before the weights and f.
    matrix = np.ones((3, 10), dtype=np.float32)
    matrix[1, 2] = math.nan
    with pytest.raises(NonFiniteInputError, match="update 1 "):
        reference.RULES[name](matrix.tolist(), f=5)
    with pytest.raises(NonFiniteInputError, match="update 1 "):
        fast.RULES[name](matrix, f=5)


def test_fast_rules_do_not_depend_on_the_thread_count():
    # Every partial sum belongs to a fixed group of columns and groups add in order, whatever the threads.
    generator = np.random.default_rng(2)
    matrix = generator.normal(size=(9, 3 * kernels.GROUP_COLUMNS + 5)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append({name: rule(matrix, f=3 if name != "mean" else 0) for name, rule in fast.RULES.items()})
    finally:
        torch.set_num_threads(before)
    for name in fast.RULES:
        one, two = results[0][name], results[1][name]
        assert torch.equal(one.values, two.values), name
        assert (one.used, one.discarded) == (two.used, two.discarded), name


def test_sorting_network_cut_to_the_middle_still_finds_it():
    # The cut network must leave the rows a rule reads exactly as a full sort would, for every input order.
    generator = np.random.default_rng(4)
    for n in AWKWARD_N:
        for f in (0, (n - 1) // 4, (n - 1) // 2):
            columns = generator.permuted(np.tile(np.arange(n, dtype=np.float32), (500, 1)), axis=1).T.copy()
            got = fast.median(columns, f=f).values.numpy()
            np.testing.assert_array_equal(got, np.median(columns, axis=0).astype(np.float32))
            got = fast.trimmed_mean(columns, f=f).values.numpy()
            np.testing.assert_array_equal(got, np.full(500, (n - 1) / 2, dtype=np.float32))
