"""Governance, rewards and autonomy with real processes: votes change the next round, only nodes with accepted
work may propose and vote, a rule-breaking update is slashed and the ledger still
verifies, and a slow trainer adapts H to make the deadline. Those whose subject is the books (votes, proposals, a
slash) run once on SQLite and once on PostgreSQL (the `store_url` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import subprocess
import sys
import urllib.parse

import numpy as np

from server.keys import NodeKey
from shared.governance import Proposal, Vote
from tests.conftest import ROOT
from tests.integration.test_protocol_errors import Client, honest_update
from shared.wire import RoundOpen


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_proposal_passed_by_vote_changes_the_next_rounds_config(processes, loopback_namespace, tmp_path,
                                                                  store_url):
    coordinator = processes.coordinator("--inner-steps", "6", "--batch", "8", "--deadline-seconds", "120",
                                        store=store_url)
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
    with coordinator.read_store() as books:
        steps = {u.round: u.inner_steps for u in books.updates() if u.accepted}
    assert steps[changed_at] == 4
    assert all(h == 6 for r, h in steps.items() if r < changed_at)
    assert status["job"]["inner_steps"] == 4


class GovernanceApi:
    """Signed proposals and votes POSTed over one kept-alive connection, so that thousands take seconds."""

    def __init__(self, url: str):
        address = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)

    def post(self, kind: str, message: Proposal | Vote, key: NodeKey) -> tuple[int, dict]:
        signed = dataclasses.replace(message, signature=key.sign(message.signing_bytes()))
        self.connection.request("POST", f"/api/governance/{kind}", json.dumps(signed.to_dict()),
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())


def a_job_whose_trainer_earned_reputation(processes, tmp_path, store: str | None = None):
    """A one-round job, finished, so that no round commits while the test runs; its one trainer's accepted update
    earned it reputation. Returns the coordinator and the trainer's key."""
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "8", "--rounds", "1",
                                        "--deadline-seconds", "600", store=store)
    coordinator.wait_ready()
    key_file = tmp_path / "worker.key"
    processes.trainer(coordinator.url, "--key-file", str(key_file), "--transport", "websocket")
    coordinator.wait_for(lambda s: s["state"] == "finished", 180, "the one round that earns the trainer reputation")
    return coordinator, NodeKey.load_or_create(key_file)


def lr_proposal(key: NodeKey, round_: int, note: str = "") -> Proposal:
    return Proposal(key.node_id, "set_param", {"name": "lr", "value": 0.001}, round_, note)


def test_a_never_admitted_key_cannot_fill_the_proposal_limit_and_a_node_with_work_still_proposes(
        processes, loopback_namespace, tmp_path, store_url):  # fmt: skip
    coordinator, worker = a_job_whose_trainer_earned_reputation(processes, tmp_path, store_url)
    api, stranger = GovernanceApi(coordinator.url), NodeKey()

    refusals = [api.post("proposals", lr_proposal(stranger, 10**15, note=str(i)), stranger) for i in range(127)]
    assert {code for code, _ in refusals} == {403}
    assert all("only admitted nodes may propose" in body["error"] for _, body in refusals)
    assert coordinator.status_of("/api/governance")["proposals"] == []

    current = coordinator.status()["round"]
    code, state = api.post("proposals", lr_proposal(worker, current), worker)
    assert code == 201 and state["status"] == "open"
    listed = coordinator.status_of("/api/governance")["proposals"]
    assert [p["proposal"]["proposer"] for p in listed] == [worker.node_id]


def test_votes_from_fresh_keys_are_refused_unstored_and_a_vote_with_weight_is_one_row(processes,
                                                                                      loopback_namespace, tmp_path,
                                                                                      store_url):
    coordinator, worker = a_job_whose_trainer_earned_reputation(processes, tmp_path, store_url)
    api, current = GovernanceApi(coordinator.url), coordinator.status()["round"]
    code, state = api.post("proposals", lr_proposal(worker, current), worker)
    assert code == 201
    proposal_id = state["proposal"]["id"]

    def stored_votes(books) -> list[tuple]:
        return [(v["proposal_id"], v["voter"], v["approve"], v["round"]) for p in books.proposals() for v in p["votes"]]

    with coordinator.read_store() as books:  # read while the coordinator runs, as an auditor may
        blob = books.get_meta("governance")
        fresh = [NodeKey() for _ in range(1500)]
        refusals = [api.post("votes", Vote(proposal_id, key.node_id, True, current), key) for key in fresh]
        assert {code for code, _ in refusals} == {403}
        assert all("only admitted nodes may vote" in body["error"] for _, body in refusals)
        assert stored_votes(books) == []

        code, _ = api.post("votes", Vote(proposal_id, worker.node_id, True, current), worker)
        assert code == 201
        assert stored_votes(books) == [(proposal_id, worker.node_id, True, current)]
        assert books.get_meta("governance") == blob  # a vote is a row; the governance state is written with a round


def test_a_rule_breaking_update_is_slashed_and_the_ledger_still_verifies(processes, loopback_namespace, store_url):
    coordinator = processes.coordinator("--deadline-seconds", "600", store=store_url)
    coordinator.wait_ready()

    async def scenario():
        cheat, honest = await Client.join(coordinator.url), await Client.join(coordinator.url)
        for node in (cheat, honest):  # round 0: verified work earns both the start grant, and a stake from it
            assignment = await node.receive(RoundOpen)
            params = await node.model(assignment)
            assert (await node.send_update(assignment, await honest_update(coordinator, node, assignment,
                                                                           params))).accepted
        assignment = await cheat.receive(RoundOpen)
        params = await cheat.model(assignment)
        values = await honest_update(coordinator, cheat, assignment, params)
        values[7] = np.inf
        verdict = await cheat.send_update(assignment, values)
        second = await honest.receive(RoundOpen)
        good = await honest.send_update(second, await honest_update(coordinator, honest, second, params))
        await honest.receive(RoundOpen)  # the next round: round 1 is committed
        return cheat.key.node_id, honest.key.node_id, verdict, good

    cheat, honest, verdict, good = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert not verdict.accepted and "finite-values" in verdict.rule.split(",")
    assert good.accepted

    ledger = coordinator.status_of("/api/ledger")
    kinds = {(e["kind"], e["node"]) for e in ledger["entries"] if e["round"] == 2}  # booked as round 1 commits
    assert ("slash", cheat) in kinds and ("reward", honest) in kinds
    assert ("reward", cheat) not in kinds
    balances = ledger["balances"]
    assert balances[f"stake:{cheat}"] < balances[f"stake:{honest}"]
    assert sum(balances.values()) == 0  # double entry: credits equal debits

    verified = cli("ledger", "verify", *coordinator.store_options())
    assert verified.returncode == 0, verified.stderr
    assert "ledger intact" in verified.stdout


def test_a_trainer_slower_than_the_deadline_adapts_h_and_makes_the_next_deadline(processes, loopback_namespace,
                                                                                  tmp_path):
    # a rulebook that caps the round deadline at 6 s, so only the trainer can adapt (by running fewer steps)
    rules = (ROOT / "shared" / "default_rules.toml").read_text().replace(
        '{ param = "deadline_seconds", op = "<=", value = 3600.0 }', '{ param = "deadline_seconds", op = "<=", value = 6.0 }')
    assert "value = 6.0" in rules
    (tmp_path / "rules.toml").write_text(rules)
    job_h, step_floor, longest_deadline = 300, 0.025, 6.0
    coordinator = processes.coordinator("--inner-steps", str(job_h), "--batch", "8", "--deadline-seconds", "5",
                                        "--rules", str(tmp_path / "rules.toml"))
    coordinator.wait_ready()
    # slow by construction, on any machine: every step sleeps 25 ms first, so the job's 300 steps take at least
    # 7.5 s, more than the longest deadline the rules allow
    assert job_h * step_floor > longest_deadline
    processes.trainer(coordinator.url, min_step_seconds=step_floor)
    coordinator.wait_for(lambda s: s["round"] >= 2, 300, "two rounds")
    with coordinator.read_store() as books:
        rounds = {r.round - 1: (r.opened_at, r.deadline) for r in books.rounds() if r.round >= 1}
        updates = {u.round: (u.inner_steps, u.received_at) for u in books.updates() if u.accepted}
    # round 0: nothing measured yet, so the trainer ran the assignment in full, and it missed the deadline
    first_h, first_received = updates[0]
    opened, deadline = rounds[0]
    assert first_h == job_h
    assert first_received - opened > job_h * step_floor > longest_deadline
    assert deadline - opened > longest_deadline  # the coordinator had to push the deadline back

    # round 1: the autonomy loop, having measured the speed, chose fewer steps than assigned ...
    adapted_h, received = updates[1]
    opened, deadline = rounds[1]
    assert adapted_h < job_h
    # ... and its update arrived by the round's own deadline. The stored deadline is that original one, not a
    # pushed-back one: a push-back sets it at least 5 s (the rules' shortest deadline) past a deadline of at
    # least 5 s, beyond the 6 s the rules allow from the round's opening
    assert deadline - opened <= longest_deadline + 1e-6
    assert received <= deadline


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

    for body, status, expected in [
            (b"{not json", 400, "refused"), (b"x" * 100_000, 400, "exceeds"),
            (json.dumps({"proposer": "a" * 64, "kind": "set_param", "round": 0,
                         "payload": {"name": "lr", "value": 0.001}, "signature": "0" * 128}).encode(),
             403, "only admitted nodes may propose")]:
        code, text = post(body)
        assert code == status and expected in text, (code, text)
    assert coordinator.status_of("/api/governance") == before
