"""Rewards earned by a real trainer: `python -m server trainer` over a WebRTC data channel trains, is paid, checks
its signed receipt itself, and `python -m server ledger verify` accepts the books; an edit of its reward does not
pass. The scripted client of test_protocol_errors is here only to break a rule beside it. On SQLite and on PostgreSQL
(the `store_url` fixture)."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np

from tests.integration.forgery import write_as_forger
from tests.integration.test_governance import cli
from tests.integration.test_protocol_errors import Client
from server.keys import NodeKey
from shared.wire import RoundOpen


def test_a_real_trainer_earns_a_receipt_it_verifies_and_ledger_verify_accepts_the_books(processes,
                                                                                      loopback_namespace, tmp_path,
                                                                                      store_url):
    # a tiny job: two rounds of two inner steps; the default share of spot checks re-executes a new node's updates
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "600",
                                        "--rounds", "2", store=store_url)
    coordinator.wait_ready()

    async def rule_breaker():
        """Round 0's first node: a NaN update, refused, then gone (so that no round waits for it)."""
        client = await Client.join(coordinator.url)
        assignment = await client.receive(RoundOpen)
        params = await client.model(assignment)
        values = np.full(params.size, 1e-3, np.float32)
        values[7] = np.nan
        verdict = await client.send_update(assignment, values)
        await client.ws.close()
        return client.key.node_id, assignment.round, verdict

    cheat, cheat_round, verdict = asyncio.run(asyncio.wait_for(rule_breaker(), 60))
    assert cheat_round == 0 and not verdict.accepted and "finite-values" in verdict.rule.split(",")

    key_file = tmp_path / "trainer.key"
    trainer = processes.trainer(coordinator.url, "--key-file", str(key_file), "--max-rounds", "2", progress=True)
    assert trainer.wait(240) == 0, trainer.output()
    node = NodeKey.load_or_create(key_file).node_id
    status = coordinator.wait_for(lambda s: s["state"] == "finished", 60, "the job's two rounds")
    (row,) = [n for n in status["nodes"] if n["id"] == node]
    assert row["updates_accepted"] == 2
    coordinator.stop()

    with coordinator.read_store() as books:
        paths = {n["id"]: n["last_path"] for n in books.nodes()}
        updates, entries = books.updates(), books.ledger_entries()
    assert paths[node] == "webrtc"  # the data channel, not the WebSocket fallback
    assert [(u.round, u.node_id, u.accepted) for u in updates] == [(0, cheat, False), (0, node, True), (1, node, True)]
    assert "finite-values" in updates[0].reason
    rewards = [e for e in entries if e["kind"] == "reward" and e["node"] == node]
    assert [e["round"] for e in rewards] == [1, 2]  # booked as rounds 1 and 2 commit
    assert not [e for e in entries if e["kind"] in ("reward", "grant") and e["node"] == cheat]

    # the trainer checked its round-1 receipt (hash, postings, the coordinator's signature) before it showed the
    # balance the receipt states; a receipt that did not verify would have been ignored, leaving no balance
    output = trainer.output()
    assert "does not verify" not in output and "malformed receipt" not in output, output
    shown = re.search(r"round 1 closed: .* \| balance ([0-9,.]+) credits", output)
    assert shown is not None, output
    assert shown.group(1) == f"{rewards[0]['balances'][node] / 1e6:,.6f}"
    assert rewards[0]["balances"][node] > 0

    verified = cli("ledger", "verify", *coordinator.store_options())
    assert verified.returncode == 0, verified.stderr
    assert "ledger intact" in verified.stdout and "2 rewards recomputed" in verified.stdout, verified.stdout

    # the trainer's first reward, doubled in place: verify names that entry
    seq = rewards[0]["seq"]
    doubled = {**rewards[0], "postings": [[account, amount * 2] for account, amount in rewards[0]["postings"]]}
    write_as_forger(coordinator, "UPDATE ledger SET entry = ? WHERE seq = ?", (json.dumps(doubled), seq))
    tampered = cli("ledger", "verify", *coordinator.store_options())
    assert tampered.returncode == 1 and f"entry {seq}" in tampered.stderr, tampered.stderr
