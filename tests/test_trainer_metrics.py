"""A trainer's own metrics (server/trainer_metrics.py) from the events its node reports, on a clock the test sets."""

from __future__ import annotations

from prometheus_client import generate_latest

from server.trainer_metrics import TrainerMetrics
from tests.integration.test_metrics import parse_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: TrainerMetrics) -> dict[tuple[str, frozenset], float]:
    return parse_metrics(generate_latest(metrics.registry).decode())


def verdict(accepted: bool, rule: str = "") -> dict:
    return {"accepted": accepted, "rule": rule}


def test_utilisation_is_training_time_over_the_wall_time_from_one_assignment_to_the_next():
    clock = Clock()
    m = TrainerMetrics(clock)
    m.observe("round", {"round": 1})
    assert samples(m)[("swarmgrad_trainer_utilisation", frozenset())] == 0  # no whole round yet
    m.trained(3.0)
    clock.now += 4.0
    m.observe("round", {"round": 2})
    assert samples(m)[("swarmgrad_trainer_utilisation", frozenset())] == 0.75
    clock.now += 10.0  # a round this node sat out (no training): the last measured value stays
    m.observe("round", {"round": 3})
    s = samples(m)
    assert s[("swarmgrad_trainer_utilisation", frozenset())] == 0.75
    assert s[("swarmgrad_trainer_training_seconds_total", frozenset())] == 3.0
    assert s[("swarmgrad_trainer_round", frozenset())] == 3


def test_verdicts_count_by_outcome_and_rule_and_model_bytes_by_source():
    m = TrainerMetrics()
    for event in (verdict(True), verdict(False, "norm-bound"), verdict(True)):
        m.observe("update", event)
    m.observe("model", {"source": "blobs", "from_peers": 300, "from_coordinator": 200})
    m.observe("model", {"source": "link", "bytes": 50})
    m.inner_step(4.25, 1234.5)
    s = samples(m)
    assert s[("swarmgrad_trainer_rounds_total", frozenset())] == 3
    assert s[("swarmgrad_trainer_updates_accepted_total", frozenset())] == 2
    assert s[("swarmgrad_trainer_updates_rejected_total", frozenset({("rule", "norm-bound")}))] == 1
    assert s[("swarmgrad_trainer_model_bytes_total", frozenset({("source", "peers")}))] == 300
    assert s[("swarmgrad_trainer_model_bytes_total", frozenset({("source", "coordinator")}))] == 250
    assert (s[("swarmgrad_trainer_inner_loss", frozenset())], s[("swarmgrad_trainer_tokens_per_second", frozenset())]) \
        == (4.25, 1234.5)
