"""The condition language and rule evaluation: every op, the combinators, typed errors, default rules."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.governance import (
    ConditionError,
    Governance,
    GovernanceError,
    MissingParamError,
    ParamTypeError,
    Rule,
    Rulebook,
    check_condition,
    evaluate,
    validate,
)

FAST = settings(max_examples=60, deadline=None, database=None)
ROOT = Path(__file__).resolve().parents[1]

numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False))
ORDER = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}


def leaf(op, value=None, param="x"):
    return {"param": param, "op": op} if op == "finite" else {"param": param, "op": op, "value": value}


def rule(rule_id, condition, action="update", slash=False, enabled=True):
    return Rule.from_dict({"id": rule_id, "action": action, "condition": condition, "reason": f"because {rule_id}",
                           "slash": slash, "enabled": enabled})


@FAST
@given(op=st.sampled_from(sorted(ORDER)), actual=numbers, bound=numbers)
def test_ordering_ops_agree_with_python(op, actual, bound):
    assert evaluate(check_condition(leaf(op, bound)), {"x": actual}) == ORDER[op](actual, bound)


@FAST
@given(actual=st.one_of(numbers, st.text(max_size=5), st.booleans(), st.none()),
       other=st.one_of(numbers, st.text(max_size=5), st.booleans(), st.none()))
def test_equality_ops_are_complements_and_bools_only_equal_bools(actual, other):
    eq = evaluate(check_condition(leaf("==", other)), {"x": actual})
    ne = evaluate(check_condition(leaf("!=", other)), {"x": actual})
    assert eq != ne
    if isinstance(actual, bool) != isinstance(other, bool):
        assert not eq


@FAST
@given(actual=st.integers(0, 20), members=st.lists(st.integers(0, 20), max_size=8))
def test_membership_ops(actual, members):
    assert evaluate(check_condition(leaf("in", members)), {"x": actual}) == (actual in members)
    assert evaluate(check_condition(leaf("not_in", members)), {"x": actual}) == (actual not in members)


@FAST
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=10))
def test_finite_holds_exactly_when_every_value_is_finite(values):
    cond = check_condition(leaf("finite"))
    assert evaluate(cond, {"x": values}) == all(math.isfinite(v) for v in values)
    assert evaluate(cond, {"x": [values, [1.0]]}) == all(math.isfinite(v) for v in values)


def test_nan_fails_every_ordering_rule():
    for op in ORDER:
        assert evaluate(check_condition(leaf(op, 1.0)), {"x": float("nan")}) is False


@FAST
@given(xs=st.lists(st.integers(-5, 5), min_size=0, max_size=5), bound=st.integers(-5, 5))
def test_all_any_not_follow_boolean_logic(xs, bound):
    leaves = [leaf("<=", bound, param=f"p{i}") for i in range(len(xs))]
    params = {f"p{i}": x for i, x in enumerate(xs)}
    expected = [x <= bound for x in xs]
    assert evaluate(check_condition({"all": leaves}), params) == all(expected)
    assert evaluate(check_condition({"any": leaves}), params) == any(expected)
    assert evaluate(check_condition({"not": {"all": leaves}}), params) == (not all(expected))


def test_ref_compares_with_another_param():
    cond = check_condition({"param": "numel", "op": "==", "ref": "expected_numel"})
    assert evaluate(cond, {"numel": 10, "expected_numel": 10})
    assert not evaluate(cond, {"numel": 9, "expected_numel": 10})
    with pytest.raises(MissingParamError) as err:
        evaluate(cond, {"numel": 10}, rule_id="shape")
    assert err.value.param == "expected_numel" and err.value.rule_id == "shape"


def test_missing_param_is_a_typed_error_naming_rule_and_param():
    book = Rulebook([rule("norm-bound", leaf("<=", 100.0, param="pseudo_gradient_norm"))])
    with pytest.raises(MissingParamError, match="norm-bound.*pseudo_gradient_norm") as err:
        book.validate("update", {"loss": 1.0})
    assert isinstance(err.value, GovernanceError)


def test_ordering_a_string_against_a_number_is_a_typed_error():
    with pytest.raises(ParamTypeError, match="cannot order"):
        evaluate(check_condition(leaf("<=", 0.01, param="lr")), {"lr": "0.001"}, rule_id="lr-ceiling")
    with pytest.raises(ParamTypeError, match="finite"):
        evaluate(check_condition(leaf("finite")), {"x": "nan"})


@pytest.mark.parametrize("bad, fragment", [
    ({"param": "x", "op": "eval", "value": 1}, "unknown op"),
    ({"param": "__import__('os')", "op": "==", "value": 1}, "identifier"),
    ({"param": "x", "op": "<=", "value": [1]}, "finite number"),
    ({"param": "x", "op": "<=", "value": float("inf")}, "finite number"),
    ({"param": "x", "op": "<=", "value": None}, "orders numbers or strings"),
    ({"param": "x", "op": "in", "value": 3}, "list of scalars"),
    ({"param": "x", "op": "finite", "value": 3}, "takes no value"),
    ({"param": "x", "op": "==", "value": 1, "ref": "y"}, "exactly one"),
    ({"all": {"param": "x", "op": "==", "value": 1}}, "list of conditions"),
    ({"all": [], "any": []}, "must be"),
    ("x <= 1", "table/object"),
])
def test_malformed_conditions_are_refused_with_the_fault_named(bad, fragment):
    with pytest.raises(ConditionError, match=fragment):
        check_condition(bad)


def test_conditions_are_bounded_in_depth_and_size():
    deep = leaf("==", 1)
    for _ in range(20):
        deep = {"not": deep}
    with pytest.raises(ConditionError, match="deeper"):
        check_condition(deep)
    with pytest.raises(ConditionError, match="nodes"):
        check_condition({"any": [leaf("==", i) for i in range(100)]})


def test_decision_lists_every_rule_that_allowed_or_blocked():
    book = Rulebook([
        rule("finite-values", leaf("finite", param="norm"), slash=True),
        rule("norm-bound", leaf("<=", 10.0, param="norm"), slash=True),
        rule("staleness", leaf("<=", 1, param="staleness")),
        rule("other-action", leaf("==", 1, param="never_read"), action="admission"),
        rule("disabled", leaf("==", 1, param="never_read"), enabled=False),
    ])
    d = validate(book, "update", {"norm": 50.0, "staleness": 0})
    assert not d.allowed
    assert d.allowed_by == ["finite-values", "staleness"]
    assert d.blocked_by == ["norm-bound"]
    assert d.reasons == ["because norm-bound"]
    assert d.slash
    ok = book.validate("update", {"norm": 5.0, "staleness": 1})
    assert ok.allowed and ok.blocked_by == [] and not ok.slash
    late = book.validate("update", {"norm": 5.0, "staleness": 2})
    assert late.blocked_by == ["staleness"] and not late.slash


def test_unknown_action_and_duplicate_rule_ids_are_refused():
    book = Rulebook([rule("a", leaf("==", 1))])
    with pytest.raises(GovernanceError, match="unknown action"):
        book.validate("mint_money", {})
    with pytest.raises(GovernanceError, match="duplicate"):
        Rulebook([rule("a", leaf("==", 1)), rule("a", leaf("==", 2))])


def test_rule_round_trips_through_dict_and_refuses_unknown_fields():
    r = rule("lr-ceiling", {"all": [leaf("<=", 0.01, "lr"), leaf(">", 0, "lr")]}, action="round_config")
    assert Rule.from_dict(r.to_dict()) == r
    with pytest.raises(GovernanceError, match="unknown fields"):
        Rule.from_dict({**r.to_dict(), "code": "print(1)"})
    with pytest.raises(GovernanceError, match="action"):
        Rule.from_dict({**r.to_dict(), "action": "everything"})


def test_default_rules_allow_a_good_update_and_block_nan_and_norm_with_slash():
    rules = Governance.default().rules
    good = {"pseudo_gradient_norm": 3.5, "loss": 2.1, "numel": 1000, "expected_numel": 1000,
            "updates_this_round": 0, "staleness": 0, "tokens": 4096}
    assert rules.validate("update", good).allowed
    nan = rules.validate("update", {**good, "pseudo_gradient_norm": float("nan")})
    assert set(nan.blocked_by) == {"finite-values", "norm-bound"} and nan.slash
    big = rules.validate("update", {**good, "pseudo_gradient_norm": 1e6})
    assert big.blocked_by == ["norm-bound"] and big.slash
    twice = rules.validate("update", {**good, "updates_this_round": 1})
    assert twice.blocked_by == ["one-update-per-round"] and not twice.slash


def test_default_rules_cover_every_action_with_their_params():
    g = Governance.default()
    assert g.rules.validate("round_config", g.params).allowed
    assert not g.rules.validate("round_config", {**g.params, "lr": 0.5}).allowed
    admit = {"node_id": "n1", "joins_last_minute": 3, "reputation": 0}
    assert g.rules.validate("admission", admit).allowed
    assert g.rules.validate("admission", {**admit, "reputation": -201}).blocked_by == ["reputation-floor"]
    assert g.rules.validate("admission", {**admit, "joins_last_minute": 60}).blocked_by == ["joins-per-minute"]
    assert g.rules.validate("storage", {"checkpoints_kept": 6}).blocked_by == ["max-checkpoints"]
    assert g.rules.required_params("admission") == {"node_id", "joins_last_minute", "reputation"}


def test_bounds_read_numeric_limits_from_rules():
    rules = Governance.default().rules
    b = rules.bounds("round_config", "deadline_seconds")
    assert (b.low, b.high) == (5.0, 3600.0)
    assert b.clamp(1.0) == 5.0 and b.clamp(10_000.0) == 3600.0 and b.clamp(60.0) == 60.0
    lr = rules.bounds("round_config", "lr")
    assert lr.high == 0.01 and lr.low == 0.0 and not lr.low_inclusive
    assert rules.bounds("admission", "reputation").low == -200


def test_shared_governance_modules_import_without_site_packages():
    code = "import shared.agent, shared.rewards; shared.governance.Governance.default()"
    subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, check=True, timeout=30)
