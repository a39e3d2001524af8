"""Prometheus metrics from real processes: the coordinator's /metrics against its own /api/status and ledger after a
3-round run with a rejected update, and a trainer's own --metrics-port while it trains."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import Counter

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from shared.wire import RoundOpen
from tests.conftest import free_port
from tests.integration.test_protocol_errors import Client

TRAIN_ARGS = ("--inner-steps", "6", "--batch", "8", "--deadline-seconds", "90")
STEP_SECONDS = 0.25  # each of the trainer's inner steps takes at least this long: it trains while the test scrapes it


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, parsed as Prometheus parses it: (sample name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")  # the Prometheus text format
        return parse_metrics(r.read().decode())


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (n, labels), value in samples.items() if n == name}


async def claim_too_many_tokens(url: str, params: int) -> str:
    """A node that claims more tokens than its assignment allows: refused by the `claims` rule; then it leaves."""
    client = await Client.join(url)
    assignment = await client.receive(RoundOpen)
    verdict = await client.send_update(assignment, np.zeros(params, np.float32), tokens=10**12)
    await client.ws.close()
    assert not verdict.accepted
    return verdict.rule


def test_metrics_equal_the_status_and_the_ledger_after_a_three_round_run(processes, loopback_namespace):
    coordinator = processes.coordinator(*TRAIN_ARGS, "--rounds", "3")
    ready = coordinator.wait_ready()
    # before any round: the counters are there, at zero
    empty = scrape(coordinator.url + "/metrics")
    assert sample(empty, "swarmgrad_rounds_total") == 0 and sample(empty, "swarmgrad_round_duration_seconds_count") == 0
    assert sample(empty, "swarmgrad_validation_loss") == ready["val_loss"]

    # the first round opens for this node alone, so its refused update is booked in round 1
    assert asyncio.run(asyncio.wait_for(claim_too_many_tokens(coordinator.url, ready["job"]["params"]), 60)) == "claims"
    metrics_port = free_port()
    trainer = processes.trainer(coordinator.url, "--metrics-port", str(metrics_port), min_step_seconds=STEP_SECONDS)

    # the trainer's own metrics, while it trains: once its second round is assigned, it has had a verdict and a
    # whole round's utilisation
    deadline, own = time.time() + 240, {}
    while time.time() < deadline and not own.get(("swarmgrad_trainer_utilisation", frozenset()), 0):
        assert trainer.proc.poll() is None, trainer.output()
        try:
            own = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        except OSError:
            pass  # not serving yet
        time.sleep(0.1)
    accepted = sample(own, "swarmgrad_trainer_updates_accepted_total")
    assert accepted >= 1
    assert sample(own, "swarmgrad_trainer_rounds_total") == accepted  # an honest trainer: every update accepted
    assert 0 < sample(own, "swarmgrad_trainer_utilisation") <= 1
    assert sample(own, "swarmgrad_trainer_tokens_per_second") > 0
    assert 0 < sample(own, "swarmgrad_trainer_inner_loss") < math.log(256) + 1  # a byte-level model's loss
    assert sample(own, "swarmgrad_trainer_training_seconds_total") >= 6 * STEP_SECONDS
    assert sum(labelled(own, "swarmgrad_trainer_model_bytes_total", "source").values()) >= 4 * ready["job"]["params"]

    status = coordinator.wait_for(lambda s: s["state"] == "finished", 300, "3 committed rounds")
    assert trainer.wait(60) == 0
    ledger = coordinator.status_of("/api/ledger?limit=10000")
    m = scrape(coordinator.url + "/metrics")

    history = [h for h in status["history"] if h["round"] > 0]
    assert sample(m, "swarmgrad_rounds_total") == status["round"] == len(history) == 3
    assert sample(m, "swarmgrad_round_duration_seconds_count") == 3
    assert sample(m, "swarmgrad_round_duration_seconds_bucket", le="+Inf") == 3
    assert sample(m, "swarmgrad_round_duration_seconds_sum") > 0
    assert sample(m, "swarmgrad_updates_accepted_total") == sum(h["accepted"] for h in history) == 3
    assert labelled(m, "swarmgrad_updates_rejected_total", "rule") == {"claims": 1}
    assert sum(h["rejected"] for h in history) == 1
    assert sample(m, "swarmgrad_tokens_total") == sum(h["tokens"] for h in history) > 0
    assert sample(m, "swarmgrad_received_bytes_total") == sum(h["bytes"] for h in history) == 3 * 4 * ready["job"]["params"]
    assert sample(m, "swarmgrad_sent_bytes_total") == sum(h["coordinator_bytes_out"] for h in history) > 0
    assert sample(m, "swarmgrad_validation_loss") == status["val_loss"]
    assert sample(m, "swarmgrad_finished") == 1
    nodes = Counter((n["kind"], n["state"]) for n in status["nodes"])
    assert {(dict(k)["kind"], dict(k)["state"]): v for (n, k), v in m.items() if n == "swarmgrad_nodes"} == nodes
    assert sum(nodes.values()) == 2  # the refused node is known too
    assert sample(m, "swarmgrad_intake_pending_payloads") == status["intake"]["pending_payloads"]
    assert sample(m, "swarmgrad_intake_deferred_payloads") == status["intake"]["deferred"]

    # the ledger: entries by kind, and where every minted micro-credit is
    kinds = Counter(e["kind"] for e in ledger["entries"])
    assert labelled(m, "swarmgrad_ledger_entries_total", "kind") == kinds
    assert kinds["reward"] == 3
    balances = ledger["balances"]
    minted = sample(m, "swarmgrad_ledger_minted_micro_credits_total")
    assert minted == -balances["mint"] > 0
    held = labelled(m, "swarmgrad_ledger_held_micro_credits", "holder")
    assert held["fees"] == balances.get("fees", 0) and held["slashed"] == balances.get("slashed", 0)
    assert held["stakes"] == sum(v for a, v in balances.items() if a.startswith("stake:"))
    assert sum(held.values()) == minted
