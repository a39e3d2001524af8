"""Rules as data: a closed condition language, the rules that use it, and the decisions they make,
naming every rule that allowed or blocked an action.

Never evaluate code from the wire: a condition is checked against a fixed grammar and limits before it is
kept, and evaluating one only compares values. A rule never passes because a param was missing.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

ACTIONS = ("admission", "round_config", "update", "storage")
COMPARE_OPS = ("<=", "<", ">=", ">", "==", "!=")
MEMBER_OPS = ("in", "not_in")
OPS = COMPARE_OPS + MEMBER_OPS + ("finite",)

# Limits on what a proposal may smuggle in: a rule is evaluated for every update, so it must stay cheap.
MAX_CONDITION_DEPTH = 8
MAX_CONDITION_NODES = 64
MAX_LIST_VALUES = 10_000
MAX_REASON_CHARS = 280
MAX_RULES = 256
MAX_FINITE_CHECK_VALUES = 1_000_000  # the coordinator passes norms, not whole tensors; this is a backstop

RULE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class GovernanceError(ValueError):
    """A governance input was malformed or not allowed here; the message says which and why."""


class ConditionError(GovernanceError):
    """A condition is not valid in the condition language (unknown op, bad value, too deep or too big)."""


class MissingParamError(ConditionError):
    """A rule reads a param that the caller did not pass. The caller must pass every param its rules read."""

    def __init__(self, rule_id: str, param: str):
        self.rule_id = rule_id
        self.param = param
        super().__init__(f"rule {rule_id!r} needs param {param!r}, which was not passed")


class ParamTypeError(ConditionError):
    """A param has a type the rule's op cannot compare (for example a string against a number)."""


# ---------------------------------------------------------------------------------------------------
# The condition language.
#
#   leaf:        {"param": "lr", "op": "<=", "value": 0.01}
#                {"param": "numel", "op": "==", "ref": "expected_numel"}   (compare with another param)
#                {"param": "pseudo_gradient_norm", "op": "finite"}
#   combinators: {"all": [c, ...]}   {"any": [c, ...]}   {"not": c}
#
# all([]) is true and any([]) is false, as in Python.


def is_number(x: Any) -> bool:
    """A number a rule can order: int, float or Fraction, never a bool."""
    return isinstance(x, (int, float, Fraction)) and not isinstance(x, bool)


def _is_json_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, str)) or is_number(x)


def check_condition(cond: Any) -> dict:
    """Check a condition's structure and return a detached copy. Raises ConditionError naming the fault."""
    count = [0]

    def walk(c: Any, depth: int, where: str) -> dict:
        count[0] += 1
        if count[0] > MAX_CONDITION_NODES:
            raise ConditionError(f"condition has more than {MAX_CONDITION_NODES} nodes")
        if depth > MAX_CONDITION_DEPTH:
            raise ConditionError(f"condition nests deeper than {MAX_CONDITION_DEPTH} at {where}")
        if not isinstance(c, Mapping):
            raise ConditionError(f"condition at {where} must be a table/object, got {type(c).__name__}")
        keys = set(c)
        if keys in ({"all"}, {"any"}):
            (key,) = keys
            items = c[key]
            if not isinstance(items, (list, tuple)):
                raise ConditionError(f"{key!r} at {where} must hold a list of conditions")
            return {key: [walk(x, depth + 1, f"{where}.{key}[{i}]") for i, x in enumerate(items)]}
        if keys == {"not"}:
            return {"not": walk(c["not"], depth + 1, f"{where}.not")}
        if "param" not in keys or "op" not in keys:
            raise ConditionError(
                f"condition at {where} must be {{param, op, value|ref}} or all/any/not, got keys {sorted(keys)}"
            )
        param, op = c["param"], c["op"]
        if not isinstance(param, str) or not PARAM_NAME.match(param):
            raise ConditionError(f"param name at {where} must be an identifier, got {param!r}")
        if op not in OPS:
            raise ConditionError(f"unknown op {op!r} at {where}; ops are {', '.join(OPS)}")
        if op == "finite":
            if keys != {"param", "op"}:
                raise ConditionError(f"op 'finite' at {where} takes no value or ref")
            return {"param": param, "op": op}
        if keys == {"param", "op", "ref"}:
            ref = c["ref"]
            if not isinstance(ref, str) or not PARAM_NAME.match(ref):
                raise ConditionError(f"ref at {where} must be a param name, got {ref!r}")
            return {"param": param, "op": op, "ref": ref}
        if keys != {"param", "op", "value"}:
            raise ConditionError(f"condition at {where} needs exactly one of 'value' or 'ref', got keys {sorted(keys)}")
        value = c["value"]
        if op in MEMBER_OPS:
            if not isinstance(value, (list, tuple)) or not all(_is_json_scalar(v) for v in value):
                raise ConditionError(f"op {op!r} at {where} needs a list of scalars as value")
            if len(value) > MAX_LIST_VALUES:
                raise ConditionError(f"list at {where} holds {len(value)} values, limit {MAX_LIST_VALUES}")
            return {"param": param, "op": op, "value": list(value)}
        if not _is_json_scalar(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConditionError(f"op {op!r} at {where} needs a finite number, string, bool or null as value")
        if op in ("<=", "<", ">=", ">") and not (is_number(value) or isinstance(value, str)):
            raise ConditionError(f"op {op!r} at {where} orders numbers or strings, not {value!r}")
        return {"param": param, "op": op, "value": value}

    return walk(cond, 0, "condition")


def _equal(a: Any, b: Any) -> bool:
    # 1 == True in Python; in a rule they are different things, so a bool only equals a bool.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _all_finite(value: Any, rule_id: str, param: str) -> bool:
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > MAX_FINITE_CHECK_VALUES:
            raise ParamTypeError(f"rule {rule_id!r}: param {param!r} has over {MAX_FINITE_CHECK_VALUES} values")
        if is_number(v):
            if isinstance(v, float) and not math.isfinite(v):
                return False
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            raise ParamTypeError(f"rule {rule_id!r}: 'finite' needs numbers in {param!r}, got {type(v).__name__}")
    return True


def evaluate(cond: Mapping, params: Mapping[str, Any], rule_id: str = "<condition>") -> bool:
    """True when params satisfy a checked condition. Raises MissingParamError or ParamTypeError."""
    if "all" in cond:
        return all(evaluate(c, params, rule_id) for c in cond["all"])
    if "any" in cond:
        return any(evaluate(c, params, rule_id) for c in cond["any"])
    if "not" in cond:
        return not evaluate(cond["not"], params, rule_id)
    param, op = cond["param"], cond["op"]
    if param not in params:
        raise MissingParamError(rule_id, param)
    actual = params[param]
    if op == "finite":
        return _all_finite(actual, rule_id, param)
    if "ref" in cond:
        if cond["ref"] not in params:
            raise MissingParamError(rule_id, cond["ref"])
        expected = params[cond["ref"]]
    else:
        expected = cond["value"]
    if op in MEMBER_OPS:
        if not _is_json_scalar(actual):
            raise ParamTypeError(f"rule {rule_id!r}: op {op!r} needs a scalar {param!r}, got {type(actual).__name__}")
        inside = any(_equal(actual, v) for v in expected)
        return inside if op == "in" else not inside
    if op == "==":
        return _equal(actual, expected)
    if op == "!=":
        return not _equal(actual, expected)
    both_numbers = is_number(actual) and is_number(expected)
    both_strings = isinstance(actual, str) and isinstance(expected, str)
    if not (both_numbers or both_strings):
        raise ParamTypeError(
            f"rule {rule_id!r}: cannot order {param!r}={actual!r} ({type(actual).__name__}) "
            f"against {expected!r} ({type(expected).__name__})"
        )
    # A NaN compares false with everything, so a NaN param fails every ordering rule: the safe way to fail.
    if op == "<=":
        return actual <= expected
    if op == "<":
        return actual < expected
    if op == ">=":
        return actual >= expected
    return actual > expected


def condition_params(cond: Mapping) -> set[str]:
    """Every param name a condition reads, so a caller can check it passes them all."""
    if "all" in cond or "any" in cond:
        return set().union(*(condition_params(c) for c in cond.get("all", cond.get("any", []))))
    if "not" in cond:
        return condition_params(cond["not"])
    return {cond["param"]} | ({cond["ref"]} if "ref" in cond else set())


# ---------------------------------------------------------------------------------------------------
# Rules and decisions.


@dataclass(frozen=True)
class Rule:
    """One rule: while enabled, `action` is allowed only if `condition` holds for its params.

    slash marks misbehaviour: a node whose update breaks this rule loses part of its stake.
    """

    id: str
    action: str
    condition: dict
    reason: str
    slash: bool = False
    enabled: bool = True

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "action": self.action,
            "condition": copy.deepcopy(self.condition),
            "reason": self.reason,
            "slash": self.slash,
            "enabled": self.enabled,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Rule:
        if not isinstance(d, Mapping):
            raise GovernanceError(f"a rule must be a table/object, got {type(d).__name__}")
        unknown = set(d) - {"id", "action", "condition", "reason", "slash", "enabled"}
        if unknown:
            raise GovernanceError(f"rule has unknown fields {sorted(unknown)}")
        rule_id = d.get("id")
        if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
            raise GovernanceError(f"rule id must match {RULE_ID.pattern}, got {rule_id!r}")
        action = d.get("action")
        if action not in ACTIONS:
            raise GovernanceError(f"rule {rule_id!r}: action must be one of {ACTIONS}, got {action!r}")
        reason = d.get("reason")
        if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_CHARS:
            raise GovernanceError(f"rule {rule_id!r}: reason must be 1-{MAX_REASON_CHARS} characters")
        slash, enabled = d.get("slash", False), d.get("enabled", True)
        if not isinstance(slash, bool) or not isinstance(enabled, bool):
            raise GovernanceError(f"rule {rule_id!r}: slash and enabled must be booleans")
        if "condition" not in d:
            raise GovernanceError(f"rule {rule_id!r} has no condition")
        try:
            condition = check_condition(d["condition"])
        except ConditionError as exc:
            raise ConditionError(f"rule {rule_id!r}: {exc}") from exc
        return cls(rule_id, action, condition, reason, slash, enabled)


@dataclass(frozen=True)
class Verdict:
    """What one rule said about one action."""

    rule_id: str
    passed: bool
    reason: str
    slash: bool

    def to_dict(self) -> dict:
        return {"rule_id": self.rule_id, "passed": self.passed, "reason": self.reason, "slash": self.slash}

    @classmethod
    def from_dict(cls, d: Mapping) -> Verdict:
        return cls(str(d["rule_id"]), bool(d["passed"]), str(d["reason"]), bool(d["slash"]))


@dataclass(frozen=True)
class Decision:
    """Every enabled rule for an action and its verdict. Allowed only when none blocked it."""

    action: str
    verdicts: tuple[Verdict, ...]

    @property
    def allowed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def allowed_by(self) -> list[str]:
        return [v.rule_id for v in self.verdicts if v.passed]

    @property
    def blocked_by(self) -> list[str]:
        return [v.rule_id for v in self.verdicts if not v.passed]

    @property
    def reasons(self) -> list[str]:
        """Why it was blocked, one reason per blocking rule (empty when allowed)."""
        return [v.reason for v in self.verdicts if not v.passed]

    @property
    def slash(self) -> bool:
        """True when a blocking rule marks misbehaviour: the rewards module slashes the node's stake."""
        return any(v.slash and not v.passed for v in self.verdicts)

    def to_dict(self) -> dict:
        return {"action": self.action, "allowed": self.allowed, "verdicts": [v.to_dict() for v in self.verdicts]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Decision:
        return cls(str(d["action"]), tuple(Verdict.from_dict(v) for v in d["verdicts"]))


@dataclass(frozen=True)
class Bounds:
    """The numeric interval that an action's enabled top-level rules allow for one param."""

    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True

    def clamp(self, x: float) -> float:
        """Nearest value inside inclusive bounds; a strict bound still fails validation at its edge."""
        if self.low is not None and x < self.low:
            x = self.low
        if self.high is not None and x > self.high:
            x = self.high
        return x


class Rulebook:
    """The rules in force, in id order, so every peer evaluates them in the same order."""

    def __init__(self, rules: Iterable[Rule] = ()):
        by_id: dict[str, Rule] = {}
        for rule in rules:
            if rule.id in by_id:
                raise GovernanceError(f"duplicate rule id {rule.id!r}")
            by_id[rule.id] = rule
        if len(by_id) > MAX_RULES:
            raise GovernanceError(f"{len(by_id)} rules, limit {MAX_RULES}")
        self._rules = dict(sorted(by_id.items()))

    def __iter__(self):
        return iter(self._rules.values())

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, rule_id: str) -> bool:
        return rule_id in self._rules

    def get(self, rule_id: str) -> Rule:
        try:
            return self._rules[rule_id]
        except KeyError:
            raise GovernanceError(f"no rule {rule_id!r}") from None

    def for_action(self, action: str) -> list[Rule]:
        if action not in ACTIONS:
            raise GovernanceError(f"unknown action {action!r}; actions are {ACTIONS}")
        return [r for r in self._rules.values() if r.action == action and r.enabled]

    def required_params(self, action: str) -> set[str]:
        """Every param the enabled rules of an action read: what a caller of validate() must pass."""
        return set().union(*(condition_params(r.condition) for r in self.for_action(action)))

    def validate(self, action: str, params: Mapping[str, Any]) -> Decision:
        """Evaluate every enabled rule for `action`. Raises MissingParamError when a rule's param is absent:
        a rule must never pass just because its caller forgot to measure something."""
        if not isinstance(params, Mapping):
            raise GovernanceError(f"params must be a mapping, got {type(params).__name__}")
        verdicts = tuple(
            Verdict(r.id, evaluate(r.condition, params, r.id), r.reason, r.slash) for r in self.for_action(action)
        )
        return Decision(action, verdicts)

    def bounds(self, action: str, param: str) -> Bounds:
        """The interval that constant comparisons in enabled rules (leaves, or leaves under 'all') allow."""
        b = Bounds()

        def leaves(c: Mapping) -> Iterable[Mapping]:
            if "all" in c:
                for x in c["all"]:
                    yield from leaves(x)
            elif "param" in c:
                yield c

        for rule in self.for_action(action):
            for leaf in leaves(rule.condition):
                if leaf["param"] != param or "value" not in leaf or not is_number(leaf["value"]):
                    continue
                v, op = leaf["value"], leaf["op"]
                if op in (">=", ">", "==") and (b.low is None or v > b.low or (v == b.low and op == ">")):
                    b = Bounds(v, op != ">", b.high, b.high_inclusive)
                if op in ("<=", "<", "==") and (b.high is None or v < b.high or (v == b.high and op == "<")):
                    b = Bounds(b.low, b.low_inclusive, v, op != "<")
        return b

    def replace(self, rule: Rule) -> Rulebook:
        return Rulebook([r for r in self if r.id != rule.id] + [rule])

    def without(self, rule_id: str) -> Rulebook:
        self.get(rule_id)
        return Rulebook(r for r in self if r.id != rule_id)

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self]

    @classmethod
    def from_list(cls, items: Iterable[Mapping]) -> Rulebook:
        return cls(Rule.from_dict(d) for d in items)


def validate(rules: Rulebook, action: str, params: Mapping[str, Any]) -> Decision:
    """Module-level form of Rulebook.validate, for callers that hold only a Rulebook."""
    return rules.validate(action, params)
