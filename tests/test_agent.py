"""Autonomy loops: H from measured speed, the coordinator's deadline and quarantine, governance before act."""

import math
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.coordinator.governor import Governor
from server.coordinator.store import Store
from server.keys import NodeKey
from shared.agent import (
    Action,
    Agent,
    CoordinatorObservation,
    CoordinatorPolicy,
    NodeReport,
    PlanError,
    TrainerPolicy,
    percentile,
    plan_inner_steps,
    round_deadline,
    standing,
)
from shared.governance import Bounds, Governance, Rule, Rulebook

FAST = settings(max_examples=80, deadline=None, database=None)


def validator(g: Governance):
    return lambda action, params: g.rules.validate(action, params)


# ---- plan_inner_steps ----


@FAST
@given(step=st.floats(1e-4, 50.0), deadline=st.floats(1.0, 1000.0), overhead_share=st.floats(0.0, 1.5),
       min_h=st.integers(1, 20), extra_h=st.integers(0, 5000), safety=st.floats(0.5, 1.0),
       batch=st.integers(1, 64), data=st.data())
def test_a_plan_that_claims_the_deadline_meets_it_with_the_most_steps(step, deadline, overhead_share, min_h,
                                                                     extra_h, safety, batch, data):
    min_batch = data.draw(st.integers(1, batch))
    overhead = deadline * overhead_share
    max_h = min_h + extra_h
    plan = plan_inner_steps(step, deadline, overhead, min_h, max_h, safety, batch=batch, min_batch=min_batch)
    assert min_h <= plan.inner_steps <= max_h and min_batch <= plan.batch <= batch
    per_step = Fraction(step) * plan.batch / batch
    budget = (Fraction(deadline) - Fraction(overhead)) * Fraction(safety)
    if plan.meets_deadline:
        assert plan.inner_steps * per_step + Fraction(overhead) <= Fraction(deadline)
        assert plan.inner_steps * per_step <= budget
        # no more steps would have fit at this batch, unless H is already at its ceiling
        assert plan.inner_steps == max_h or (plan.inner_steps + 1) * per_step > budget
        if plan.batch < batch:  # the batch only shrinks when the full batch could not fit min_h steps
            assert min_h * Fraction(step) > budget
    else:
        assert min_h * Fraction(step) * min_batch / batch > budget
        assert (plan.inner_steps, plan.batch) == (min_h, min_batch)


def test_the_batch_shrinks_when_min_h_steps_do_not_fit():
    plan = plan_inner_steps(1.0, 10.0, 2.0, 16, 100, 1.0, batch=16, min_batch=4)
    assert (plan.inner_steps, plan.batch, plan.meets_deadline) == (16, 8, True)
    assert plan.expected_seconds == 10.0


def test_without_batch_a_slow_node_is_told_it_will_be_late():
    plan = plan_inner_steps(10.0, 30.0, 5.0, 5, 100, 0.9)
    assert (plan.inner_steps, plan.batch, plan.meets_deadline) == (5, None, False)
    assert plan.expected_seconds == 55.0


@pytest.mark.parametrize("args, kwargs, fragment", [
    ((0.0, 10, 1, 1, 5), {}, "measured_step_seconds"),
    ((math.nan, 10, 1, 1, 5), {}, "finite"),
    ((1.0, -1, 1, 1, 5), {}, "deadline"),
    ((1.0, 10, 1, 6, 5), {}, "exceeds"),
    ((1.0, 10, 1, 0, 5), {}, "min_h"),
    ((1.0, 10, 1, 1, 5, 1.5), {}, "safety"),
    ((1.0, 10, 1, 1, 5), {"batch": 8}, "together"),
    ((1.0, 10, 1, 1, 5), {"batch": 8, "min_batch": 9}, "min_batch"),
])
def test_plan_inner_steps_refuses_nonsense(args, kwargs, fragment):
    with pytest.raises(PlanError, match=fragment):
        plan_inner_steps(*args, **kwargs)


# ---- the trainer's loop ----


def assignment(g: Governance, round: int, **overrides):
    return {**g.round_config(**overrides), "round": round}


def test_a_trainer_slower_than_the_deadline_adapts_h_and_gets_its_next_update_in_on_time():
    g = Governance.default()
    true_step = 0.5  # seconds per step at the job's batch of 16
    ran = []

    def train(config):
        ran.append(config)
        return {"steps": config["inner_steps"], "seconds": config["inner_steps"] * true_step * config["batch"] / 16,
                "overhead_seconds": 3.0}

    trainer = TrainerPolicy(validator(g), train=train, min_batch=4)
    trainer.assign(assignment(g, 1, deadline_seconds=30.0))
    first = trainer.run_once()
    assert ran[0]["inner_steps"] == 100 and not first.reflection["measured"][0]["on_time"]  # 53 s > 30 s
    trainer.assign(assignment(g, 2, deadline_seconds=30.0))
    second = trainer.run_once()
    assert second.reflection["measured"][0]["on_time"]
    assert 0 < ran[1]["inner_steps"] < 100 and ran[1]["batch"] == 16
    assert trainer.sample_seconds == pytest.approx(true_step / 16)
    assert trainer.safety < trainer.base_safety  # a missed deadline buys more slack


def test_a_fast_trainer_never_runs_more_than_the_jobs_h():
    g = Governance.default()
    trainer = TrainerPolicy(validator(g), sample_seconds=1e-6)
    trainer.assign(assignment(g, 1))
    report = trainer.run_once()
    assert report.allowed[0].params["inner_steps"] == g.params["inner_steps"]
    assert trainer.next_config["inner_steps"] == g.params["inner_steps"]


def test_trainer_plans_that_break_a_rule_are_dropped_with_the_decision_kept():
    g = Governance.default()
    ran = []
    trainer = TrainerPolicy(validator(g), train=lambda c: ran.append(c) or {"steps": 1, "seconds": 1.0},
                            sample_seconds=1.5, min_batch=1)
    trainer.assign(assignment(g, 1, deadline_seconds=6.0))  # only a batch below the rule's 4 would fit
    report = trainer.run_once()
    assert ran == [] and report.allowed == []
    (blocked,) = report.blocked
    assert blocked.decision.blocked_by == ["min-batch"] and trainer.blocked[-1] is blocked


def test_a_trainer_that_runs_rounds_itself_reports_with_measure():
    g = Governance.default()
    trainer = TrainerPolicy(validator(g))
    trainer.measure(steps=50, seconds=25.0, batch=16, overhead_seconds=2.0, deadline_seconds=20.0)
    trainer.run_once()
    assert trainer.sample_seconds == pytest.approx(25.0 / (50 * 16)) and trainer.overhead_seconds == 2.0
    restored = TrainerPolicy(validator(g))
    restored.load(trainer.to_dict())
    assert restored.to_dict() == trainer.to_dict()


def test_reason_validates_every_planned_action_before_act_sees_it():
    seen, acted = [], []

    class Probe(Agent):
        def monitor(self):
            return {}

        def plan(self, obs):
            return [Action("a", "update", {"ok": True}), Action("b", "update", {"ok": False})]

        def act(self, plan):
            acted.extend(a.kind for a in plan)
            return []

        def reflect(self, results):
            return {}

        def adapt(self, reflection):
            pass

    rules = Rulebook.from_list([{"id": "ok", "action": "update", "reason": "must be ok",
                                 "condition": {"param": "ok", "op": "==", "value": True}}])

    def spy(action, params):
        seen.append(params)
        return rules.validate(action, params)

    report = Probe(spy).run_once()
    assert seen == [{"ok": True}, {"ok": False}] and acted == ["a"]
    assert report.blocked[0].decision.blocked_by == ["ok"]


# ---- the coordinator's loop ----


def test_percentile_is_nearest_rank():
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([5, 1, 3, 2, 4], 90) == 5 and percentile([5, 1, 3, 2, 4], 20) == 1
    with pytest.raises(PlanError):
        percentile([], 50)


@FAST
@given(times=st.lists(st.floats(1.0, 500.0), min_size=1, max_size=30), k=st.floats(1.1, 4.0))
def test_the_deadline_grows_with_slower_nodes_and_stays_inside_the_rule_bounds(times, k):
    bounds = Bounds(5.0, True, 3600.0, True)
    base = round_deadline(times, bounds=bounds)
    slower = round_deadline([t * k for t in times], bounds=bounds)
    assert 5.0 <= base <= slower <= 3600.0
    unclamped = round_deadline(times)
    assume(5.0 <= unclamped and unclamped * k <= 3600.0)
    assert slower == pytest.approx(base * k)


def report(node, round_seconds, on_time=True, steps=100, batch=16):
    return NodeReport(node, steps, batch, seconds=round_seconds - 2.0, overhead_seconds=2.0, on_time=on_time)


def coordinator(g):
    return CoordinatorPolicy(validator(g), lambda: g.rules.bounds("round_config", "deadline_seconds"))


def test_the_coordinator_deadline_moves_with_the_spread_of_node_speeds():
    g = Governance.default()
    policy = coordinator(g)
    config = g.round_config(deadline_seconds=100.0)
    narrow = [report(f"n{i}", 60.0 + i) for i in range(10)]
    policy.observe(CoordinatorObservation(1, config, narrow))
    policy.run_once()
    assert policy.deadline_seconds == pytest.approx(68.0 * 1.25)  # p90 of 60..69 is 68
    wide = [report(f"n{i}", 20.0 + 15 * i) for i in range(10)]
    policy.observe(CoordinatorObservation(2, config, wide))
    policy.run_once()
    assert policy.deadline_seconds == pytest.approx(min(200.0, 140.0 * policy.margin / policy.MARGIN_DOWN))


def test_the_deadline_moves_at_most_twofold_and_never_past_the_rules():
    g = Governance.default()
    policy = coordinator(g)
    policy.observe(CoordinatorObservation(1, g.round_config(deadline_seconds=100.0), [report("n", 10_000.0)]))
    policy.run_once()
    assert policy.deadline_seconds == 200.0
    policy.observe(CoordinatorObservation(2, g.round_config(deadline_seconds=3000.0), [report("n", 10_000.0)]))
    policy.run_once()
    assert policy.deadline_seconds == 3600.0  # the deadline-range rule's ceiling


def test_report_time_is_scaled_to_the_jobs_h_and_batch():
    r = NodeReport("n", steps=50, batch=8, seconds=10.0, overhead_seconds=1.0, on_time=True)
    assert r.round_seconds(100, 16) == 41.0


def test_nodes_below_the_reputation_floor_are_quarantined_and_released_when_the_rules_allow():
    g = Governance.default()
    policy = coordinator(g)
    config = g.round_config()
    nodes = {"good": standing("good", 30), "bad": standing("bad", -250), "edge": standing("edge", -200)}
    policy.observe(CoordinatorObservation(1, config, [], nodes))
    result = policy.run_once()
    assert result.results[-1] == {"admitted": ["edge", "good"], "quarantined": ["bad"]}
    assert policy.quarantined["bad"].blocked_by == ["reputation-floor"]
    # quarantine holds while the node is not re-checked, and lifts when a vote lowers the floor
    policy.observe(CoordinatorObservation(2, config, [], {"good": nodes["good"]}))
    policy.run_once()
    assert list(policy.quarantined) == ["bad"]
    floor = g.rules.get("reputation-floor").to_dict()
    floor["condition"]["value"] = -1000
    g.rules = g.rules.replace(Rule.from_dict(floor))
    policy.observe(CoordinatorObservation(3, config, [], nodes))
    assert policy.run_once().results[-1]["quarantined"] == []


def test_the_join_rate_cap_never_evicts_admitted_nodes(tmp_path):
    # the coordinator's own pieces: the governor counts joins per address, and each round the policy re-checks
    # every member's standing (built as Coordinator._adapt builds it) against the admission rules
    governor = Governor(Store(tmp_path / "state.db"), NodeKey(), {})
    cap = int(governor.governance.rules.get("joins-per-minute").to_dict()["condition"]["value"])
    address = "192.0.2.7"
    members = ["member"] + [f"joiner-{i}" for i in range(cap - 1)]
    assert all(governor.admit(node, 0, address=address).allowed for node in members)
    # the address is at its cap: one more new key from it is refused now ...
    assert governor.admit("newcomer", 0, address=address).blocked_by == ["joins-per-minute"]
    # ... while a member coming back from it is no join, and the round's re-check keeps every member admitted
    assert governor.admit("member", 0, address=address, returning=True).allowed
    policy = CoordinatorPolicy(lambda action, params: governor.governance.rules.validate(action, params),
                               lambda: governor.governance.rules.bounds("round_config", "deadline_seconds"))
    policy.observe(CoordinatorObservation(1, dict(governor.params), [],
                                          {node: standing(node, governor.reputation[node]) for node in members}))
    assert policy.run_once().results[-1] == {"admitted": sorted(members), "quarantined": []}


def test_the_margin_grows_when_too_few_nodes_make_the_deadline():
    g = Governance.default()
    policy = coordinator(g)
    late = [report(f"n{i}", 50.0, on_time=i < 5) for i in range(10)]
    policy.observe(CoordinatorObservation(1, g.round_config(), late))
    policy.run_once()
    assert policy.margin == pytest.approx(1.25 * 1.1)
    restored = coordinator(g)
    restored.load(policy.to_dict())
    assert restored.to_dict() == policy.to_dict()


def test_without_usable_reports_the_deadline_stays_and_garbled_reports_are_ignored():
    g = Governance.default()
    policy = coordinator(g)
    garbled = [NodeReport("n", 0, 16, 5.0, 1.0, True), NodeReport("m", 10, 16, math.inf, 1.0, True)]
    policy.observe(CoordinatorObservation(1, g.round_config(deadline_seconds=42.0), garbled))
    policy.run_once()
    assert policy.deadline_seconds == 42.0


# ---- RoundPlanner: the loop a trainer or browser node runs around each assignment ----

from shared.agent import RoundPlanner  # noqa: E402
from shared.governance import Governance as _Governance  # noqa: E402


def _governance_document() -> dict:
    g = _Governance.default()
    return {"rules": g.rules.to_list(), "params": g.params}


def test_round_planner_runs_the_first_assignment_as_given_then_fits_h_to_the_deadline():
    planner = RoundPlanner()
    config = {"inner_steps": 100, "batch": 16, "lr": 0.001, "deadline_seconds": 10.0}
    assert planner.plan(_governance_document(), config, 0) == (100, 16)  # nothing measured yet
    planner.finished(steps=100, seconds=20.0, batch=16, overhead_seconds=1.0, deadline_seconds=10.0)
    steps, batch = planner.plan(_governance_document(), config, 1)
    assert batch == 16 and 1 <= steps < 100
    assert steps * 0.2 + 1.0 <= 10.0  # 0.2 s per step as measured, plus overhead, fits the deadline
    assert "deadline" in planner.note


def test_round_planner_without_the_rules_runs_the_assignment_as_given():
    planner = RoundPlanner()
    planner.finished(steps=100, seconds=20.0, batch=16, overhead_seconds=1.0, deadline_seconds=10.0)
    assert planner.plan(None, {"inner_steps": 100, "batch": 16, "lr": 0.001, "deadline_seconds": 10.0}, 1) == (100, 16)
    assert "unknown" in planner.note
