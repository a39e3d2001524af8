"""`ledger verify` on a real job (a coordinator and two websocket trainers, one of which says goodbye): the books
verify, and a re-hashed overpayment or a dropped last entry does not, even with the balance table and the round
heads rewritten to match. On SQLite and on PostgreSQL (the `store_url` fixture)."""

from __future__ import annotations

import subprocess
import sys

from server.keys import NodeKey
from tests.conftest import ROOT
from tests.integration.forgery import forged_copy
from tests.test_books import overpay

TRAIN_ARGS = ("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "120", "--rounds", "2")


def verify(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "ledger", "verify", *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_ledger_verify_passes_a_real_job_and_fails_its_rehashed_forgeries(processes, loopback_namespace, tmp_path,
                                                                          store_url):
    coordinator = processes.coordinator(*TRAIN_ARGS, store=store_url)
    coordinator.wait_ready()
    leaver_key = tmp_path / "leaver.key"
    processes.trainer(coordinator.url, "--transport", "websocket", "--max-rounds", "1", "--key-file", str(leaver_key))
    coordinator.wait_for(lambda s: s["round"] >= 1, 180, "the first trainer's round")
    processes.trainer(coordinator.url, "--transport", "websocket")  # the second round needs someone
    coordinator.wait_for(lambda s: s["state"] == "finished", 180, "two committed rounds")
    coordinator.stop()
    coordinator_key = NodeKey.load_or_create(coordinator.data_dir / "coordinator.key")

    honest = verify(*coordinator.store_options())
    assert honest.returncode == 0, honest.stderr
    assert "ledger intact" in honest.stdout and "3 round records signed" in honest.stdout
    with coordinator.read_store() as books:
        entries, balances = books.ledger_entries(), books.balances()
    assert any(e["kind"] == "reward" for e in entries)
    # the first trainer said goodbye after its round: whatever stake it had posted came back when that round (or
    # the next) closed, and nobody else's did
    leaver = NodeKey.load_or_create(leaver_key).node_id
    staked = any(e["kind"] == "stake" and e["node"] == leaver for e in entries)
    assert [e["node"] for e in entries if e["kind"] == "unstake"] == ([leaver] if staked else [])
    assert f"stake:{leaver}" not in balances

    def forged(name: str, edit, sign_with: NodeKey | None = None) -> list[str]:
        return forged_copy(coordinator, tmp_path, name, edit, sign_with)

    # the coordinator itself overpays: chain re-hashed, balances rewritten, every head rewritten and re-signed
    result = verify(*forged("overpaid", overpay, sign_with=coordinator_key))
    assert result.returncode == 1 and "does not follow the formula" in result.stderr, result.stderr
    # anyone else doing the same cannot sign as the coordinator whose id the auditor trusts
    result = verify(*forged("overpaid_by_another", overpay, sign_with=NodeKey()),
                    "--coordinator-id", coordinator_key.node_id)
    assert result.returncode == 1 and "does not carry coordinator" in result.stderr, result.stderr
    # the last entry dropped, the balance table and the heads rewritten to match: the signed head differs
    result = verify(*forged("truncated", lambda entries: entries[:-1]))
    assert result.returncode == 1 and "the record does not carry" in result.stderr, result.stderr
