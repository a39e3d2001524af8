"""The contracts of the reference aggregation rules in shared/aggregate.py."""

import math

import pytest

from shared.aggregate import (
    RULES,
    Aggregate,
    AggregationError,
    NonFiniteInputError,
    centered_clip,
    krum,
    krum_scores,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)

# Five honest updates near (1, 1) and two liars far away: the shape every robust rule must survive.
HONEST = [[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.2], [1.2, 1.0]]
LIARS = [[-40.0, -40.0], [50.0, 45.0]]


def test_rules_registry_names_every_rule():
    assert set(RULES) == {"mean", "median", "trimmed", "krum", "multikrum", "cclip"}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_rejected_naming_its_index(name, bad):
    updates = [[1.0, 2.0], [1.0, 2.0], [1.0, bad], [1.0, 2.0], [1.0, 2.0]]
    with pytest.raises(NonFiniteInputError, match="update 2 ") as caught:
        RULES[name](updates, f=1 if name != "mean" else 0)
    assert (caught.value.index, caught.value.position) == (2, 1)


@pytest.mark.parametrize("name", sorted(RULES))
def test_ragged_updates_are_rejected(name):
    with pytest.raises(AggregationError, match="update 1 has 1 values"):
        RULES[name]([[1.0, 2.0], [1.0], [1.0, 2.0]])


@pytest.mark.parametrize("name", sorted(RULES))
def test_no_updates_is_an_error(name):
    with pytest.raises(AggregationError, match="no updates"):
        RULES[name]([])


@pytest.mark.parametrize("name", sorted(RULES))
def test_all_equal_inputs_aggregate_to_that_input_and_discard_none(name):
    same = [[0.5, -3.0, 7.25]] * 7
    result = RULES[name](same, f=2)
    assert result.values == pytest.approx([0.5, -3.0, 7.25], abs=0)
    assert result.discarded == []


@pytest.mark.parametrize("name", ["median", "trimmed", "krum", "multikrum", "cclip"])
def test_robust_rules_stay_near_the_honest_updates_with_two_liars(name):
    result = RULES[name](HONEST + LIARS, f=2)
    assert all(abs(x - 1.0) < 0.25 for x in result.values)
    assert result.discarded == [5, 6]


def test_mean_is_weighted():
    result = mean([[1.0, 2.0], [3.0, 4.0]], [1.0, 3.0])
    assert result == Aggregate([2.5, 3.5], [0, 1], [])


def test_mean_is_pulled_arbitrarily_far_by_one_liar():
    assert mean(HONEST + [[1e6, 1e6]]).values[0] > 1e5


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, -1.0], [1.0, math.nan], [1.0]])
def test_mean_rejects_weights_that_are_not_one_positive_finite_per_update(weights):
    with pytest.raises(AggregationError, match="weight"):
        mean([[1.0], [2.0]], weights)


@pytest.mark.parametrize("name", ["median", "trimmed", "krum"])
def test_equal_say_rules_reject_unequal_weights_but_accept_equal_ones(name):
    updates = HONEST + LIARS
    with pytest.raises(AggregationError, match="equal say"):
        RULES[name](updates, weights=[1.0] * 6 + [9.0], f=2)
    assert RULES[name](updates, weights=[2.0] * 7, f=2) == RULES[name](updates, f=2)


def test_median_of_odd_count_is_the_middle_value():
    assert median([[3.0, -1.0], [1.0, 5.0], [2.0, 0.0]]).values == [2.0, 0.0]


def test_median_of_even_count_averages_the_two_middle_values():
    assert median([[4.0], [1.0], [2.0], [10.0]]).values == [3.0]


@pytest.mark.parametrize("rule", [median, trimmed_mean])
def test_coordinate_wise_rules_need_n_at_least_2f_plus_1(rule):
    assert rule([[1.0]] * 5, f=2).values == [1.0]
    with pytest.raises(AggregationError, match="at least 5 updates, got 4"):
        rule([[1.0]] * 4, f=2)


def test_trimmed_mean_drops_f_from_each_end_per_coordinate():
    updates = [[1.0, 100.0], [2.0, 4.0], [3.0, 5.0], [-50.0, 6.0], [4.0, 7.0]]
    assert trimmed_mean(updates, f=1).values == [2.0, 6.0]


def test_trimmed_mean_with_f_zero_is_the_mean():
    updates = [[1.0, 2.0], [4.0, -2.0], [7.0, 3.0]]
    assert trimmed_mean(updates).values == pytest.approx(mean(updates).values)


def test_trimmed_mean_discards_only_inputs_strictly_outside_the_kept_range():
    # Three equal values at the low end: trimming one of them says nothing about its sender.
    result = trimmed_mean([[0.0], [0.0], [0.0], [1.0], [2.0]], f=1)
    assert (result.used, result.discarded) == ([0, 1, 2, 3], [4])


def test_krum_scores_sum_squared_distances_to_the_n_minus_f_minus_2_nearest():
    updates = [[0.0], [1.0], [3.0], [10.0], [11.0]]
    # f = 1: each score sums the 2 smallest squared distances to the others.
    assert krum_scores(updates, 1) == [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64]


def test_krum_accepts_n_equal_2f_plus_3_and_rejects_one_fewer():
    assert krum([[0.0], [1.0], [3.0], [10.0], [11.0]], f=1).used == [1]
    with pytest.raises(AggregationError, match="krum with f=1 needs at least 5 updates, got 4"):
        krum([[0.0], [1.0], [3.0], [10.0]], f=1)


def test_krum_returns_the_chosen_input_and_discards_the_f_worst_scores():
    result = krum([[0.0], [1.0], [3.0], [10.0], [11.0]], f=1)
    assert result == Aggregate([1.0], [1], [4])


def test_krum_breaks_equal_scores_by_lowest_index():
    # Scores 18, 9, 9, 36, 36: inputs 1 and 2 tie for best, and 3 and 4 tie for worst.
    assert krum([[3.0], [0.0], [0.0], [9.0], [9.0]], f=1) == Aggregate([0.0], [1], [])


def test_krum_discards_only_worst_scores_above_twice_the_median_score():
    # Scores 18, 9, 9, 36, 36 (median 18): the worst is not above 36, so nobody is judged an outlier.
    assert krum([[3.0], [0.0], [0.0], [9.0], [9.0]], f=1).discarded == []
    # Scores 18, 9, 9, 37, 50: only input 4 is above 36.
    assert krum([[3.0], [0.0], [0.0], [9.0], [10.0]], f=1).discarded == [4]


def test_krum_does_not_discard_honest_inputs_that_merely_score_worst():
    honest = [[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.2], [1.2, 1.0], [0.8, 1.0], [1.0, 0.8]]
    assert krum(honest, f=2).discarded == []


def test_multi_krum_averages_the_m_best_scores():
    result = multi_krum([[0.0], [1.0], [3.0], [10.0], [11.0]], f=1, m=2)
    assert result == Aggregate([0.5], [0, 1], [4])


def test_multi_krum_defaults_m_to_n_minus_f():
    assert multi_krum([[0.0], [1.0], [3.0], [10.0], [11.0]], f=1).used == [0, 1, 2, 3]


@pytest.mark.parametrize("m", [0, 5, 2.0])
def test_multi_krum_rejects_m_outside_1_to_n_minus_f(m):
    with pytest.raises(AggregationError, match="m must be"):
        multi_krum([[0.0], [1.0], [3.0], [10.0], [11.0]], f=1, m=m)


def test_centered_clip_without_clipping_is_the_mean_after_one_step_from_any_center():
    updates = [[1.0, 2.0], [3.0, -2.0], [8.0, 3.0]]
    result = centered_clip(updates, center=[100.0, -100.0], tau=1e9, iterations=1)
    assert result.values == pytest.approx([4.0, 1.0])
    assert result.discarded == []


def test_centered_clip_moves_at_most_tau_f_over_n_towards_a_liar():
    updates = [[0.0]] * 9 + [[1000.0]]
    result = centered_clip(updates, f=1, center=[0.0], tau=2.0, iterations=1)
    assert result.values == [pytest.approx(2.0 / 10)]
    assert result.discarded == [9]


def test_centered_clip_weighs_clipped_differences():
    result = centered_clip([[0.0], [10.0]], weights=[3.0, 1.0], center=[0.0], tau=4.0, iterations=1)
    assert result.values == [pytest.approx(1.0)]


def test_centered_clip_defaults_to_the_median_center_and_twice_the_median_distance():
    # Median center 1, distances 1, 0, 1, 9, 0: tau = 2, so only the input at 10 is clipped (to +2).
    result = centered_clip([[0.0], [1.0], [2.0], [10.0], [1.0]], iterations=1)
    assert result.values == [pytest.approx(1.0 + (-1.0 + 0.0 + 1.0 + 2.0 + 0.0) / 5)]
    assert result.discarded == [3]


@pytest.mark.parametrize("params", [{"tau": -1.0}, {"tau": math.nan}, {"iterations": 0}, {"center": [0.0, 1.0]}])
def test_centered_clip_rejects_bad_parameters(params):
    with pytest.raises(AggregationError, match="cclip"):
        centered_clip([[0.0], [1.0], [2.0]], **params)


def test_rules_do_not_mutate_their_inputs():
    updates = [list(u) for u in HONEST + LIARS]
    for name, rule in RULES.items():
        rule(updates, f=0 if name == "mean" else 2)
    assert updates == HONEST + LIARS
