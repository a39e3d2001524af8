"""The round strategy: the round config nodes plan from, the aggregation rule's f and its fallback, and the outer
step; and the global model the coordinator holds once."""

from __future__ import annotations

import numpy as np
import pytest

from server.coordinator.checkpoint import Checkpoint, model_hash
from server.coordinator.governor import Governor
from server.coordinator.job import JobConfig
from server.coordinator.model_state import GlobalModel
from server.coordinator.store import Store
from server.coordinator.strategy import RoundStrategy
from server.corpus import load_corpus
from server.keys import NodeKey
from shared import compress
from shared.agent import RoundPlanner
from shared.rules import Rule
from shared.model import model_config
from shared.wire import LimitExceeded, RoundOpen, decode_message

ROUND_CONFIG_KEYS = {"inner_steps", "lr", "weight_decay", "batch", "seq_len", "codec", "deadline_seconds",
                     "overlap"}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, 300_000)


def strategy(corpus, **job) -> RoundStrategy:
    job = JobConfig(**job)
    return RoundStrategy(job, model_config(job.model), compress.parse_codec(job.codec), corpus)


def governor(tmp_path) -> Governor:
    return Governor(Store(tmp_path / "state.db"), NodeKey(), JobConfig(inner_steps=40, batch=16).governed())


def test_the_round_config_carries_the_round_config_rules_and_the_governed_params(tmp_path, corpus):
    g = governor(tmp_path)
    config = strategy(corpus).round_config(g.governance, 30.0)
    assert ROUND_CONFIG_KEYS | {"rules", "params"} == set(config)
    assert (config["inner_steps"], config["batch"], config["deadline_seconds"], config["overlap"]) == (40, 16, 30.0,
                                                                                                      False)
    listed = [r for r in g.describe()["rules"] if r["action"] == "round_config" and r["enabled"]]
    assert config["rules"] == listed and len(listed) >= 5
    assert config["params"] == g.describe()["params"]


def test_a_node_plans_from_the_round_config_exactly_as_from_the_governance_document(tmp_path, corpus):
    g = governor(tmp_path)
    config = strategy(corpus).round_config(g.governance, 30.0)
    sent = RoundOpen(0, "0" * 64, "0" * 128, config, 0, 0.0)
    config = decode_message(sent.encode()).config  # as the node receives it
    from_document, from_config = RoundPlanner(), RoundPlanner()
    plans = []
    for r, seconds in enumerate([2.0, 90.0, 90.0, 10.0]):  # a node far slower than the deadline, then faster
        plans.append((from_document.plan(g.describe(), config, r),
                      from_config.plan({"rules": config["rules"], "params": config["params"]}, config, r)))
        assert from_document.note == from_config.note
        for planner, (steps, batch) in zip((from_document, from_config), plans[-1]):
            planner.finished(steps, seconds, batch, 1.0, 30.0)
    assert all(a == b for a, b in plans)
    assert plans[2][0] != (40, 16)  # the plan did cut the round: the comparison covered a real decision


def test_a_rulebook_too_large_for_one_message_leaves_the_round_config_without_it(tmp_path, corpus):
    g = governor(tmp_path)
    allowed = [f"aggregator-{i:05d}" for i in range(4000)] + ["mean"]  # a voted rule with a long list
    g.governance.rules = g.governance.rules.replace(Rule.from_dict({
        "id": "known-aggregator", "action": "round_config", "reason": "a long list",
        "condition": {"param": "aggregator", "op": "in", "value": allowed}}))
    config = strategy(corpus).round_config(g.governance, 30.0)
    assert set(config) == ROUND_CONFIG_KEYS  # nodes run the assignment as given
    RoundOpen(0, "0" * 64, "0" * 128, config, 0, 0.0).encode()  # still one control message ...
    with pytest.raises(LimitExceeded):  # ... which the rules would not have left it
        RoundOpen(0, "0" * 64, "0" * 128, {**config, "rules": g.describe()["rules"]}, 0, 0.0).encode()


def test_krum_is_told_at_most_the_f_its_update_count_allows(corpus):
    s = strategy(corpus, byzantine_fraction=0.5)
    assert s.tolerated("krum", 8) == 2 and s.tolerated("multikrum", 8) == 2  # n > 2f + 2
    assert s.tolerated("trimmed", 8) == 4
    assert s.tolerated("krum", 2) == 0


def test_a_robust_rule_with_too_few_updates_averages_the_round(corpus):
    rows = [np.full(6, 1.0, np.float32), np.full(6, 4.0, np.float32)]
    grad, discarded = strategy(corpus, byzantine_fraction=0.5).aggregate(0, rows, [1.0, 0.5], {"aggregator": "trimmed"})
    assert np.allclose(grad, 2.0) and grad.dtype == np.float32 and discarded == []  # the weighted mean


def test_no_aggregate_leaves_the_model_and_starts_the_momentum_at_zero(corpus):
    params = np.arange(5, dtype=np.float32)
    model = GlobalModel(3, params, None, model_hash(params))
    new_params, momentum = strategy(corpus).outer_step(model, None, {"outer_lr": 0.7, "outer_momentum": 0.9})
    assert np.array_equal(new_params, params) and new_params is not params
    assert np.array_equal(momentum, np.zeros(5, np.float32))


def test_the_outer_step_returns_new_arrays_and_leaves_the_held_model_alone(corpus):
    params = np.ones(4, np.float32)
    model = GlobalModel(0, params, None, model_hash(params))
    new_params, momentum = strategy(corpus).outer_step(model, np.full(4, 0.5, np.float32),
                                                       {"outer_lr": 1.0, "outer_momentum": 0.5})
    assert np.allclose(momentum, 0.5) and np.allclose(new_params, 1.0 - (0.5 + 0.5 * 0.5))
    assert np.array_equal(model.params, np.ones(4, np.float32))


def test_a_stale_outer_step_lowers_its_momentum_by_what_the_delay_adds(corpus):
    # an overlapped round's aggregate steps a model one step newer than the one it was computed on: the delay acts
    # as a momentum of 1/2 of its own, so the default 0.5 drops to 0 (0.9 to 0.4)
    params, previous = np.ones(4, np.float32), np.full(4, 0.25, np.float32)
    model = GlobalModel(2, params, previous, model_hash(params))
    grad = np.full(4, 0.5, np.float32)
    fresh = strategy(corpus).outer_step(model, grad, {"outer_lr": 1.0, "outer_momentum": 0.5})
    stale = strategy(corpus).outer_step(model, grad, {"outer_lr": 1.0, "outer_momentum": 0.5}, staleness=1)
    older = strategy(corpus).outer_step(model, grad, {"outer_lr": 1.0, "outer_momentum": 0.9}, staleness=1)
    assert np.allclose(fresh[1], 0.5 * 0.25 + 0.5) and np.allclose(fresh[0], 1.0 - (0.5 + 0.5 * fresh[1]))
    assert np.allclose(stale[1], 0.5) and np.allclose(stale[0], 1.0 - 0.5)  # plain SGD on the aggregate
    assert np.allclose(older[1], 0.4 * 0.25 + 0.5) and np.allclose(older[0], 1.0 - (0.5 + 0.4 * older[1]))


def test_the_model_bytes_are_made_once_and_follow_the_model():
    first = np.arange(3, dtype=np.float32)
    model = GlobalModel.from_checkpoint(Checkpoint(0, first, None), None)
    assert model.bytes is model.bytes and model.bytes == first.astype("<f4").tobytes()
    old_hash = model.hash
    model.advance(Checkpoint(1, first + 1, np.zeros(3, np.float32)))
    assert model.bytes == (first + 1).astype("<f4").tobytes()
    assert (model.round, model.previous_hash, model.hash) == (1, old_hash, model_hash(first + 1))


def test_a_job_stored_under_the_old_setting_names_resumes_under_the_one_name(tmp_path, corpus):
    from dataclasses import asdict

    from server.coordinator.job import load_job

    store = Store(tmp_path / "state.db")
    old = {**asdict(JobConfig(batch=12, deadline_seconds=45.0))}
    old["batch_size"], old["round_deadline"] = old.pop("batch"), old.pop("deadline_seconds")
    store.set_meta("job", old)
    store.set_meta("corpus", {"name": corpus.name, "sha256": corpus.digest})
    job = load_job(store, tmp_path, corpus, JobConfig(rounds=3))
    assert (job.batch, job.deadline_seconds, job.rounds) == (12, 45.0, 3)
    assert "batch_size" not in store.get_meta("job") and store.get_meta("job")["batch"] == 12


def test_the_delta_nodes_receive_makes_the_model_the_coordinator_holds_and_its_residual_carries(corpus):
    import torch

    from server.codecs import apply_delta, decode_numpy

    s = strategy(corpus)  # the default delta codec: int8 blockwise
    params = s.initial_parameters(0)
    model = GlobalModel(0, params, None, model_hash(params))
    target = params + np.float32(1e-3) * np.sin(np.arange(params.size, dtype=np.float32))
    applied, payload, residual = s.delta(model, target)
    assert s.delta_residual is None  # nothing changes until the round commits
    assert np.array_equal(applied, apply_delta(params, s.delta_codec, payload))
    decoded = decode_numpy(s.delta_codec, payload, params.size)
    assert torch.equal(residual, torch.from_numpy(target - params) - torch.from_numpy(decoded))
    assert 0 < float(residual.abs().max()) < 1e-5 and len(payload) < params.nbytes / 3.5
    s.delta_residual = residual  # committed: the next delta carries what this one left out
    _, again, _ = s.delta(GlobalModel(1, applied, None, model_hash(applied)), applied)
    assert np.allclose(decode_numpy(s.delta_codec, again, params.size), residual.numpy(), atol=1e-7)
