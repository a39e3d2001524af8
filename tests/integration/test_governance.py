"""Governance, rewards and autonomy with real processes: votes change the next round, a rule-breaking update is
slashed and the ledger still verifies, and a slow trainer adapts H to make the deadline."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT
from tests.integration.test_protocol_errors import Client
from shared.wire import RoundOpen


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_proposal_passed_by_vote_changes_the_next_rounds_config(processes, loopback_namespace, tmp_path):
    coordinator = processes.coordinator("--inner-steps", "6", "--batch-size", "8", "--round-deadline", "120")
    coordinator.wait_ready()
    key = tmp_path / "trainer.key"
    processes.trainer(coordinator.url, "--key-file", str(key))
    coordinator.wait_for(lambda s: s["round"] >= 1, 180, "a round that earns the trainer reputation")

    proposed = cli("governance", "propose", "--coordinator", coordinator.url, "--key-file", str(key),
                   "--set-param", "inner_steps=4", "--note", "shorter rounds")
    assert proposed.returncode == 0, proposed.stderr
    proposal_id = proposed.stdout.split()[1]
    voted = cli("governance", "vote", "--coordinator", coordinator.url, "--key-file", str(key), proposal_id, "yes")
    assert voted.returncode == 0, voted.stderr

    status = coordinator.wait_for(lambda s: s["job"]["inner_steps"] == 4, 180, "the change at a round boundary")
    listed = json.loads(cli("governance", "list", "--coordinator", coordinator.url, "--json").stdout)
    (state,) = [p for p in listed["proposals"] if p["proposal"]["id"] == proposal_id]
    assert state["status"] == "applied"
    changed_at = state["decided_round"]
    assert changed_at > state["proposal"]["round"]  # never mid-round: at the next boundary at the earliest
    coordinator.wait_for(lambda s: s["round"] >= changed_at + 1, 180, "a round under the new config")
    with sqlite3.connect(coordinator.data_dir / "state.db") as db:
        steps = dict(db.execute("SELECT round, inner_steps FROM updates WHERE accepted = 1"))
    assert steps[changed_at] == 4
    assert all(h == 6 for r, h in steps.items() if r < changed_at)
    assert status["job"]["inner_steps"] == 4


def test_a_rule_breaking_update_is_slashed_and_the_ledger_still_verifies(processes, loopback_namespace):
    coordinator = processes.coordinator("--round-deadline", "600")
    coordinator.wait_ready()

    async def scenario():
        cheat = await Client.join(coordinator.url)
        assignment = await cheat.receive(RoundOpen)
        params = await cheat.model(assignment)
        values = np.full(params.size, 1e-3, np.float32)
        values[7] = np.inf
        verdict = await cheat.send_update(assignment, values)
        honest = await Client.join(coordinator.url)
        good = await honest.send_update(await honest.receive(RoundOpen), np.full(params.size, 1e-3, np.float32))
        await honest.receive(RoundOpen)  # the next round: the first one is committed
        return cheat.key.node_id, honest.key.node_id, verdict, good

    cheat, honest, verdict, good = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert not verdict.accepted and "finite-values" in verdict.rule.split(",")
    assert good.accepted

    ledger = coordinator.status_of("/api/ledger")
    kinds = {(e["kind"], e["node"]) for e in ledger["entries"]}
    assert ("slash", cheat) in kinds and ("reward", honest) in kinds
    assert ("reward", cheat) not in kinds
    balances = ledger["balances"]
    assert balances[f"stake:{cheat}"] < balances[f"stake:{honest}"]
    assert sum(balances.values()) == 0  # double entry: credits equal debits

    verified = cli("ledger", "verify", "--data-dir", str(coordinator.data_dir))
    assert verified.returncode == 0, verified.stderr
    assert "ledger intact" in verified.stdout


def test_ledger_verify_names_the_first_altered_entry(processes, loopback_namespace):
    coordinator = processes.coordinator("--round-deadline", "600")
    coordinator.wait_ready()

    async def one_round():
        client = await Client.join(coordinator.url)
        assignment = await client.receive(RoundOpen)
        params = await client.model(assignment)
        await client.send_update(assignment, np.full(params.size, 1e-3, np.float32))
        await client.receive(RoundOpen)

    asyncio.run(asyncio.wait_for(one_round(), 120))
    coordinator.stop()
    db_path = coordinator.data_dir / "state.db"
    with sqlite3.connect(db_path) as db:
        seq, raw = db.execute("SELECT seq, entry FROM ledger WHERE kind = 'reward'").fetchone()
        entry = json.loads(raw)
        entry["postings"] = [[account, amount * 2] for account, amount in entry["postings"]]
        db.execute("UPDATE ledger SET entry = ? WHERE seq = ?", (json.dumps(entry), seq))
    result = cli("ledger", "verify", "--data-dir", str(coordinator.data_dir))
    assert result.returncode == 1
    assert f"entry {seq}" in result.stderr


def test_a_trainer_slower_than_the_deadline_adapts_h_and_makes_the_next_deadline(processes, loopback_namespace,
                                                                                  tmp_path):
    # a rulebook that caps the round deadline at 6 s, so only the trainer can adapt (by running fewer steps)
    rules = (ROOT / "shared" / "default_rules.toml").read_text().replace(
        '{ param = "deadline_seconds", op = "<=", value = 3600.0 }', '{ param = "deadline_seconds", op = "<=", value = 6.0 }')
    assert "value = 6.0" in rules
    (tmp_path / "rules.toml").write_text(rules)
    coordinator = processes.coordinator("--inner-steps", "1000", "--batch-size", "8", "--round-deadline", "5",
                                        "--rules", str(tmp_path / "rules.toml"))
    coordinator.wait_ready()
    processes.trainer(coordinator.url)
    coordinator.wait_for(lambda s: s["round"] >= 2, 420, "two rounds")
    with sqlite3.connect(coordinator.data_dir / "state.db") as db:
        rounds = {r: (opened, deadline) for r, opened, deadline in
                  db.execute("SELECT round - 1, opened_at, deadline FROM rounds WHERE round >= 1")}
        updates = {r: (h, received) for r, h, received in
                   db.execute("SELECT round, inner_steps, received_at FROM updates WHERE accepted = 1")}
    first_h, first_received = updates[0]
    assert first_h == 1000
    assert first_received - rounds[0][0] > 6  # the full H did not fit the deadline
    adapted_h, received = updates[1]
    assert adapted_h < 1000
    assert received <= rounds[1][1]  # ... and the adapted round made its deadline


def test_malformed_or_oversized_proposals_are_refused_and_change_nothing(processes):
    import urllib.error
    import urllib.request

    coordinator = processes.coordinator()
    coordinator.wait_ready()
    before = coordinator.status_of("/api/governance")

    def post(body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(coordinator.url + "/api/governance/proposals", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for body, expected in [(b"{not json", "refused"), (b"x" * 100_000, "exceeds"),
                           (json.dumps({"proposer": "a" * 64, "kind": "set_param", "round": 0,
                                        "payload": {"name": "lr", "value": 0.001}, "signature": "0" * 128}).encode(),
                            "signature")]:
        code, text = post(body)
        assert code == 400 and expected in text, (code, text)
    assert coordinator.status_of("/api/governance") == before
