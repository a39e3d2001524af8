"""Autonomy loops: monitor -> reason -> act -> reflect -> adapt, one small base class and the trainer's and
coordinator's policies, with their decisions as pure functions (plan_inner_steps, round_deadline).

Never act on an action that governance has not allowed (reason() checks every one), and never sleep or do
I/O here: the node that runs a loop owns time, training and the network, and hands them in as callables.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from shared.governance import Bounds, Decision, Rulebook

Validator = Callable[[str, Mapping[str, Any]], Decision]

MAX_KEPT_BLOCKED = 256  # blocked decisions an agent keeps in memory; the audit log keeps them all


@dataclass(frozen=True)
class Action:
    """Something an agent wants to do. governed names the governance action that must allow it, and
    params are what the rules see (and what act() uses)."""

    kind: str
    governed: str
    params: dict


@dataclass(frozen=True)
class Blocked:
    action: Action
    decision: Decision


@dataclass
class LoopReport:
    """One pass of the loop, for logs and dashboards."""

    observations: dict
    allowed: list[Action]
    blocked: list[Blocked]
    results: list
    reflection: dict


class Agent:
    """The loop. Subclasses fill in monitor, plan, act, reflect and adapt; reason is not theirs to skip:
    it validates every planned action and drops (and keeps) the blocked ones before act sees the plan."""

    def __init__(self, validate: Validator):
        self.validate = validate
        self.blocked: deque[Blocked] = deque(maxlen=MAX_KEPT_BLOCKED)

    def monitor(self) -> dict:
        raise NotImplementedError

    def plan(self, observations: dict) -> list[Action]:
        raise NotImplementedError

    def reason(self, observations: dict) -> tuple[list[Action], list[Blocked]]:
        allowed: list[Action] = []
        blocked: list[Blocked] = []
        for action in self.plan(observations):
            decision = self.validate(action.governed, action.params)
            if decision.allowed:
                allowed.append(action)
            else:
                blocked.append(Blocked(action, decision))
        self.blocked.extend(blocked)
        return allowed, blocked

    def act(self, plan: list[Action]) -> list:
        raise NotImplementedError

    def reflect(self, results: list) -> dict:
        raise NotImplementedError

    def adapt(self, reflection: dict) -> None:
        raise NotImplementedError

    def run_once(self) -> LoopReport:
        observations = self.monitor()
        allowed, blocked = self.reason(observations)
        results = self.act(allowed)
        reflection = self.reflect(results)
        self.adapt(reflection)
        return LoopReport(observations, allowed, blocked, results, reflection)


class PlanError(ValueError):
    """Inputs to a planning function are out of range (non-positive time, min above max, ...)."""


def _positive(x: float, what: str, allow_zero: bool = False) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float, Fraction)) or not math.isfinite(x):
        raise PlanError(f"{what} must be a finite number, got {x!r}")
    if x < 0 or (x == 0 and not allow_zero):
        raise PlanError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {x!r}")
    return Fraction(x)


# ---------------------------------------------------------------------------------------------------
# Trainer and browser node: how many inner steps fit before the deadline.


@dataclass(frozen=True)
class StepPlan:
    inner_steps: int
    batch: int | None
    expected_seconds: float
    meets_deadline: bool


def plan_inner_steps(measured_step_seconds: float, deadline_seconds: float, overhead_seconds: float, min_h: int,
                     max_h: int, safety: float = 0.85, *, batch: int | None = None,
                     min_batch: int | None = None) -> StepPlan:  # fmt: skip
    """The most inner steps H in [min_h, max_h] that finish within safety x (deadline - overhead).

    measured_step_seconds is one step at `batch`; a step's time is taken as proportional to its batch.
    When even min_h steps do not fit, the batch shrinks (never below min_batch) so that min_h steps do.
    The batch never grows: the job's batch is a governed setting, only the deadline forces it down.
    When nothing fits, the plan is min_h steps at the smallest batch, with meets_deadline False.
    Arithmetic is exact (Fractions of the float inputs), so the promise H x step + overhead <= deadline holds.
    """
    step = _positive(measured_step_seconds, "measured_step_seconds")
    deadline = _positive(deadline_seconds, "deadline_seconds")
    overhead = _positive(overhead_seconds, "overhead_seconds", allow_zero=True)
    margin = _positive(safety, "safety")
    if margin > 1:
        raise PlanError(f"safety is the share of the deadline to use, in (0, 1]; got {safety}")
    for name, h in (("min_h", min_h), ("max_h", max_h)):
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise PlanError(f"{name} must be a positive integer, got {h!r}")
    if min_h > max_h:
        raise PlanError(f"min_h {min_h} exceeds max_h {max_h}")
    if (batch is None) != (min_batch is None):
        raise PlanError("pass batch and min_batch together, or neither")
    if batch is not None and not (isinstance(batch, int) and isinstance(min_batch, int) and 1 <= min_batch <= batch):
        raise PlanError(f"need integers 1 <= min_batch <= batch, got min_batch={min_batch!r} batch={batch!r}")

    budget = (deadline - overhead) * margin

    def fit(step_seconds: Fraction) -> int:
        return 0 if budget <= 0 else min(max_h, math.floor(budget / step_seconds))

    def done(h: int, b: int | None, meets: bool) -> StepPlan:
        per_step = step if b is None else step * b / batch
        return StepPlan(h, b, float(overhead + h * per_step), meets)

    h = fit(step)
    if h >= min_h:
        return done(h, batch, True)
    if batch is not None and budget > 0:
        # the largest batch b with min_h x step x b / batch <= budget
        b = min(batch, math.floor(budget * batch / (min_h * step)))
        if b >= min_batch:
            return done(max(min_h, fit(step * b / batch)), b, True)
    return done(min_h, min_batch, False)


class TrainerPolicy(Agent):
    """Picks H and batch for each round from the node's measured speed, and learns that speed.

    The coordinator's assignment (a round config: round, inner_steps, batch, lr, deadline_seconds, ...)
    comes in through assign(). H never exceeds the job's inner_steps: that is DiLoCo's voted setting, and
    the deadline may only force fewer steps. Pass min_batch from the rules
    (int(rules.bounds("round_config", "batch").low)) so that a shrunken batch still passes them.
    train, when given, runs one round: it takes the planned config
    and returns {"steps", "seconds", "overhead_seconds"}; without it the node runs the round itself (read
    next_config) and reports with measure().
    """

    def __init__(self, validate: Validator, *, train: Callable[[dict], Mapping] | None = None, min_h: int = 1,
                 max_h: int = 10_000, min_batch: int = 1, safety: float = 0.85, alpha: float = 0.3,
                 sample_seconds: float | None = None, overhead_seconds: float = 0.0):  # fmt: skip
        super().__init__(validate)
        if not 0 < alpha <= 1:
            raise PlanError(f"alpha (EWMA weight of the newest measurement) must be in (0, 1], got {alpha}")
        self.train = train
        self.min_h, self.max_h, self.min_batch = min_h, max_h, min_batch
        self.base_safety = self.safety = safety
        self.alpha = alpha
        self.sample_seconds = sample_seconds  # EWMA of seconds per sample (one step at batch 1)
        self.overhead_seconds = overhead_seconds  # EWMA of fetch + upload + setup per round
        self.assignment: dict | None = None
        self.next_config: dict | None = None
        self.last_plan: StepPlan | None = None
        self._pending: list[dict] = []
        self._on_time_streak = 0

    def assign(self, assignment: Mapping[str, Any]) -> None:
        self.assignment = dict(assignment)

    def measure(self, steps: int, seconds: float, batch: int, overhead_seconds: float, deadline_seconds: float) -> None:
        """Report a round the node ran itself; the next run_once() learns from it."""
        self._pending.append({"steps": steps, "seconds": seconds, "batch": batch,
                              "overhead_seconds": overhead_seconds, "deadline_seconds": deadline_seconds})  # fmt: skip

    def monitor(self) -> dict:
        return {"assignment": self.assignment, "sample_seconds": self.sample_seconds,
                "overhead_seconds": self.overhead_seconds, "safety": self.safety}  # fmt: skip

    def plan(self, obs: dict) -> list[Action]:
        a = obs["assignment"]
        if a is None:
            return []
        job_h, job_batch = int(a["inner_steps"]), int(a["batch"])
        max_h = max(self.min_h, min(self.max_h, job_h))
        if obs["sample_seconds"] is None:
            # No measurement yet: run the job's own settings once; reflect() learns the speed from it.
            h, b = max_h, job_batch
            self.last_plan = None
        else:
            self.last_plan = plan_inner_steps(obs["sample_seconds"] * job_batch, a["deadline_seconds"],
                                              obs["overhead_seconds"], self.min_h, max_h, obs["safety"],
                                              batch=job_batch, min_batch=min(self.min_batch, job_batch))  # fmt: skip
            h, b = self.last_plan.inner_steps, self.last_plan.batch
        return [Action("run_round", "round_config", {**a, "inner_steps": h, "batch": b})]

    def act(self, plan: list[Action]) -> list:
        results = []
        for action in plan:
            self.next_config = dict(action.params)
            if self.train is not None:
                r = self.train(self.next_config)
                results.append({"steps": r["steps"], "seconds": r["seconds"], "batch": self.next_config["batch"],
                                "overhead_seconds": r.get("overhead_seconds", 0.0),
                                "deadline_seconds": self.next_config["deadline_seconds"]})  # fmt: skip
        self.assignment = None  # an assignment is run once
        results.extend(self._pending)
        self._pending = []
        return results

    def reflect(self, results: list) -> dict:
        measured = []
        for r in results:
            numbers = (r["steps"], r["seconds"], r["batch"], r["overhead_seconds"])
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
                continue  # a garbled measurement must not poison the speed estimate
            if r["steps"] <= 0 or r["seconds"] <= 0 or r["batch"] <= 0 or r["overhead_seconds"] < 0:
                continue  # nothing ran: no speed to learn
            total = r["seconds"] + r["overhead_seconds"]
            measured.append({"sample_seconds": r["seconds"] / (r["steps"] * r["batch"]),
                             "overhead_seconds": r["overhead_seconds"],
                             "on_time": total <= r["deadline_seconds"]})  # fmt: skip
        return {"measured": measured}

    def adapt(self, reflection: dict) -> None:
        for m in reflection["measured"]:
            if self.sample_seconds is None:
                self.sample_seconds, self.overhead_seconds = m["sample_seconds"], m["overhead_seconds"]
            else:
                a = self.alpha
                self.sample_seconds = a * m["sample_seconds"] + (1 - a) * self.sample_seconds
                self.overhead_seconds = a * m["overhead_seconds"] + (1 - a) * self.overhead_seconds
            if m["on_time"]:
                # Earn back margin slowly: three on-time rounds in a row before trusting the speed again.
                self._on_time_streak += 1
                if self._on_time_streak >= 3:
                    self.safety = min(self.base_safety, self.safety + 0.02)
            else:
                # A miss means the estimate was optimistic (noise, thermal throttling): keep more slack.
                self._on_time_streak = 0
                self.safety = max(0.5, self.safety * 0.9)

    def to_dict(self) -> dict:
        return {"sample_seconds": self.sample_seconds, "overhead_seconds": self.overhead_seconds,
                "safety": self.safety, "on_time_streak": self._on_time_streak}  # fmt: skip

    def load(self, d: Mapping) -> None:
        self.sample_seconds, self.overhead_seconds = d["sample_seconds"], d["overhead_seconds"]
        self.safety, self._on_time_streak = d["safety"], d["on_time_streak"]


# ---------------------------------------------------------------------------------------------------
# Coordinator: the round deadline from the spread of node speeds, and quarantine by governance.


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation, so it is always one of the values)."""
    if not values:
        raise PlanError("percentile of no values")
    if not 0 < pct <= 100:
        raise PlanError(f"percentile must be in (0, 100], got {pct}")
    ordered = sorted(values)
    # rank in exact arithmetic: 0.9 * 10 must be 9, never 9.000000000000002
    return ordered[max(0, math.ceil(Fraction(pct) * len(ordered) / 100) - 1)]


def round_deadline(round_seconds: Sequence[float], *, pct: float = 90, margin: float = 1.25,
                   bounds: Bounds | None = None) -> float:  # fmt: skip
    """pct-th percentile of the nodes' predicted round times, times margin, clamped by the rule bounds.

    The slowest (100 - pct)% are not waited for: they plan fewer inner steps instead (plan_inner_steps).
    """
    for s in round_seconds:
        _positive(s, "round seconds")
    deadline = percentile(round_seconds, pct) * margin
    return bounds.clamp(deadline) if bounds is not None else deadline


@dataclass(frozen=True)
class NodeReport:
    """What one node's update said about its speed in a round."""

    node: str
    steps: int
    batch: int
    seconds: float  # training time for `steps` steps
    overhead_seconds: float  # fetch + upload + setup
    on_time: bool

    def usable(self) -> bool:
        """Whether the report can say anything about speed (one garbled report must not stop the loop)."""
        numbers_ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                         for x in (self.steps, self.batch, self.seconds, self.overhead_seconds))  # fmt: skip
        return numbers_ok and self.steps > 0 and self.batch > 0 and self.seconds > 0 and self.overhead_seconds >= 0

    def round_seconds(self, inner_steps: int, batch: int) -> float:
        """How long this node would take for the job's full round: inner_steps steps at the job's batch."""
        return inner_steps * (self.seconds / self.steps) * (batch / self.batch) + self.overhead_seconds


def standing(node_id: str, reputation: int, **extra: Any) -> dict:
    """Admission params for re-checking a node that is already admitted, once per round.

    joins_last_minute is 0 because staying is not joining: the join-rate cap must not evict members.
    """
    return {"node_id": node_id, "reputation": reputation, "joins_last_minute": 0, **extra}


@dataclass
class CoordinatorObservation:
    round: int
    config: dict  # the round config in force (governance params plus the current deadline)
    reports: list[NodeReport] = field(default_factory=list)
    standing: dict[str, dict] = field(default_factory=dict)  # node id -> admission params (see standing())


class CoordinatorPolicy(Agent):
    """Moves the round deadline with the spread of node speeds, and keeps admitted only the nodes that
    the admission rules still allow (the reputation-floor rule among them): the rest are quarantined.

    deadline_bounds returns the interval the round_config rules allow for deadline_seconds, for example
    lambda: governance.rules.bounds("round_config", "deadline_seconds").
    The deadline moves at most MAX_DEADLINE_FACTOR per round, so one odd report cannot whipsaw it, and the
    margin over the percentile grows when too few nodes make the deadline and shrinks when all do.
    """

    MAX_DEADLINE_FACTOR = 2.0
    TARGET_ON_TIME = 0.8  # share of reporting nodes that should make the deadline
    MARGIN_UP = 1.1
    MARGIN_DOWN = 0.97

    def __init__(self, validate: Validator, deadline_bounds: Callable[[], Bounds], *, pct: float = 90,
                 margin: float = 1.25, min_margin: float = 1.05, max_margin: float = 3.0):  # fmt: skip
        super().__init__(validate)
        if not 1 <= min_margin <= margin <= max_margin:
            raise PlanError(f"need 1 <= min_margin <= margin <= max_margin, got {min_margin}, {margin}, {max_margin}")
        if not 0 < pct <= 100:
            raise PlanError(f"pct must be in (0, 100], got {pct}")
        self.deadline_bounds = deadline_bounds
        self.pct, self.margin, self.min_margin, self.max_margin = pct, margin, min_margin, max_margin
        self.deadline_seconds: float | None = None
        self.quarantined: dict[str, Decision] = {}  # node id -> the admission decision that blocked it
        self._pending: CoordinatorObservation | None = None
        self._current: CoordinatorObservation | None = None
        self._blocked_admissions: dict[str, Decision] = {}

    def observe(self, observation: CoordinatorObservation) -> None:
        """Hand in the round that just closed; the next run_once() decides the next round from it."""
        self._pending = observation

    def monitor(self) -> dict:
        self._current, self._pending = self._pending, None
        return {"observation": self._current}

    def plan(self, obs: dict) -> list[Action]:
        o: CoordinatorObservation | None = obs["observation"]
        if o is None:
            return []
        current = float(o.config["deadline_seconds"])
        target = current  # no usable reports: keep the deadline, but still let governance check it
        usable = [r for r in o.reports if r.usable()]
        if usable:
            h, b = int(o.config["inner_steps"]), int(o.config["batch"])
            target = round_deadline([r.round_seconds(h, b) for r in usable], pct=self.pct, margin=self.margin)
            f = self.MAX_DEADLINE_FACTOR
            target = self.deadline_bounds().clamp(min(current * f, max(current / f, target)))
        actions = [Action("set_deadline", "round_config", {**o.config, "deadline_seconds": target})]
        for node in sorted(o.standing):
            actions.append(Action("admit", "admission", dict(o.standing[node])))
        return actions

    def reason(self, observations: dict) -> tuple[list[Action], list[Blocked]]:
        allowed, blocked = super().reason(observations)
        self._blocked_admissions = {b.action.params["node_id"]: b.decision for b in blocked if b.action.kind == "admit"}
        return allowed, blocked

    def act(self, plan: list[Action]) -> list:
        results = []
        for action in plan:
            if action.kind == "set_deadline":
                self.deadline_seconds = action.params["deadline_seconds"]
                results.append({"deadline_seconds": self.deadline_seconds})
        checked = set(self._current.standing) if self._current is not None else set()
        # Nodes checked this round get a fresh verdict (a vote may have lowered the floor); the others
        # keep theirs until they are checked again.
        kept = {n: d for n, d in self.quarantined.items() if n not in checked}
        self.quarantined = dict(sorted({**kept, **self._blocked_admissions}.items()))
        admitted = sorted(a.params["node_id"] for a in plan if a.kind == "admit")
        results.append({"admitted": admitted, "quarantined": sorted(self.quarantined)})
        return results

    def reflect(self, results: list) -> dict:
        reports = self._current.reports if self._current is not None else []
        on_time = sum(r.on_time for r in reports)
        return {"reports": len(reports), "on_time": on_time,
                "on_time_share": on_time / len(reports) if reports else None}  # fmt: skip

    def adapt(self, reflection: dict) -> None:
        share = reflection["on_time_share"]
        if share is None:
            return
        if share < self.TARGET_ON_TIME:
            self.margin = min(self.max_margin, self.margin * self.MARGIN_UP)
        elif share == 1:
            self.margin = max(self.min_margin, self.margin * self.MARGIN_DOWN)

    def to_dict(self) -> dict:
        return {"margin": self.margin, "deadline_seconds": self.deadline_seconds,
                "quarantined": {n: d.to_dict() for n, d in self.quarantined.items()}}  # fmt: skip

    def load(self, d: Mapping) -> None:
        self.margin, self.deadline_seconds = d["margin"], d["deadline_seconds"]
        self.quarantined = {n: Decision.from_dict(x) for n, x in d["quarantined"].items()}


class RoundPlanner:
    """A node's autonomy loop around its assignments, the same for the PyTorch trainer and the browser node:
    each round it learns the last round's speed, then fits H and batch to the deadline with a TrainerPolicy
    under the rules in force (the coordinator's /api/governance document).

    Call plan() when an assignment arrives and finished() when the coordinator has judged the update.
    """

    def __init__(self) -> None:
        self.rules = Rulebook()
        self.policy = TrainerPolicy(lambda action, params: self.rules.validate(action, params))
        self._last: dict | None = None
        self.note = ""  # why the plan differs from the assignment, or why it could not be planned

    def finished(self, steps: int, seconds: float, batch: int, overhead_seconds: float,
                 deadline_seconds: float) -> None:  # fmt: skip
        self._last = {"steps": steps, "seconds": seconds, "batch": batch, "overhead_seconds": overhead_seconds,
                      "deadline_seconds": deadline_seconds}  # fmt: skip

    def plan(self, governance: Mapping | None, config: Mapping, round_: int) -> tuple[int, int]:
        """(H, batch) for an assignment's round config (inner_steps, batch, lr, deadline_seconds). Without the
        rules (governance None) the assignment runs as given."""
        steps, batch = int(config["inner_steps"]), int(config["batch"])
        self.note = ""
        if governance is None:
            self.note = "the rules in force are unknown; running the assignment as given"
            return steps, batch
        self.rules = Rulebook.from_list(governance["rules"])
        self.policy.min_batch = max(1, int(self.rules.bounds("round_config", "batch").low or 1))
        if self._last is not None:  # learn the last round's speed first: a loop pass with no assignment
            self.policy.measure(**self._last)
            self._last = None
            self.policy.run_once()
        self.policy.assign({**governance["params"], "inner_steps": steps, "batch": batch, "lr": float(config["lr"]),
                            "deadline_seconds": float(config["deadline_seconds"]), "round": round_})  # fmt: skip
        report = self.policy.run_once()
        if not report.allowed:
            blocked = sorted({r for b in report.blocked for r in b.decision.blocked_by})
            self.note = f"the planned round is blocked by {blocked}; running the assignment as given"
            return steps, batch
        planned_steps, planned_batch = int(self.policy.next_config["inner_steps"]), int(self.policy.next_config["batch"])
        if (planned_steps, planned_batch) != (steps, batch):
            self.note = (f"running H={planned_steps} x batch {planned_batch} of {steps} x {batch} to meet the "
                         f"{float(config['deadline_seconds']):.0f}s deadline")
        return planned_steps, planned_batch
