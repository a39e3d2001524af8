"""The coordinator's books as an auditor sees them: a clean leave returns the stake, and `ledger verify`'s audit
passes honest books and names each forgery, even one re-hashed through the chain after the edit."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from server.books_cli import audit_books
from server.coordinator.governor import Governor, UpdateOutcome
from server.keys import NodeKey
from server.coordinator.store import RoundRecord, Store, UpdateRecord
from shared.rewards import LedgerEntry, round_record_bytes
from tests.test_rewards import reforge

GOOD_UPDATE = {"pseudo_gradient_norm": 3.0, "loss": 2.0, "numel": 10, "expected_numel": 10, "updates_this_round": 0,
               "staleness": 0, "tokens": 1_000}


def rewrite_books(db_path: Path, edit: Callable[[list[LedgerEntry]], list[LedgerEntry]],
                  sign_with: NodeKey | None = None) -> None:
    """Edit a data directory's ledger as a forger with write access would: rebuild every hash and post-balance
    after the edit, the balance table and each round's ledger head. sign_with re-signs every round record (the
    coordinator's own key, for a coordinator that cheats, or another key); None keeps the stored signatures."""
    with sqlite3.connect(db_path) as db:
        forge_books(db, "?", edit, sign_with)


def forge_books(db, mark: str, edit: Callable[[list[LedgerEntry]], list[LedgerEntry]],
                sign_with: NodeKey | None) -> None:
    """rewrite_books on an open connection of either database (sqlite3 or psycopg), whose parameter placeholder is
    `mark` ("?" or "%s"); the caller commits."""
    def sql(text: str) -> str:
        return text.replace("?", mark)

    entries = [LedgerEntry.from_dict(json.loads(r[0])) for r in db.execute("SELECT entry FROM ledger ORDER BY seq")]
    old_hashes = [e.hash for e in entries]
    forged = reforge(edit(entries))
    db.execute("DELETE FROM ledger")
    for e in forged.entries:
        db.execute(sql("INSERT INTO ledger (seq, round, node, kind, hash, entry) VALUES (?, ?, ?, ?, ?, ?)"),
                   (e.seq, e.round, e.node, e.kind, e.hash, json.dumps(e.to_dict(), sort_keys=True)))
    db.execute("DELETE FROM balances")
    for account, amount in forged.balances().items():
        db.execute(sql("INSERT INTO balances (account, amount) VALUES (?, ?)"), (account, amount))
    for round_, model_hash, head in db.execute("SELECT round, model_hash, ledger_head FROM rounds").fetchall():
        if head in old_hashes:  # the same position in the forged log (the new last entry, if it got shorter)
            head = forged.entries[min(old_hashes.index(head), len(forged.entries) - 1)].hash
        db.execute(sql("UPDATE rounds SET ledger_head = ? WHERE round = ?"), (head, round_))
        if sign_with is not None:
            db.execute(sql("UPDATE rounds SET signature = ? WHERE round = ?"),
                       (sign_with.sign(round_record_bytes(round_, model_hash, head)), round_))


def overpay(entries: list[LedgerEntry], extra: int = 1_000) -> list[LedgerEntry]:
    """The first reward, raised by `extra` micro-credits minted to its node, memo and all."""
    i = next(k for k, e in enumerate(entries) if e.kind == "reward")
    e = entries[i]
    gross = e.memo["gross"] + extra
    postings = tuple(dataclasses.replace(p, amount=-gross) if p.account == "mint" else
                     dataclasses.replace(p, amount=p.amount + extra) if p.account == e.node else p
                     for p in e.postings)  # fmt: skip
    return entries[:i] + [dataclasses.replace(e, postings=postings, memo={**e.memo, "gross": gross})] + entries[i + 1:]


class Books:
    """A coordinator's store, governor and key, closing rounds the way Coordinator._close_round does."""

    def __init__(self, data_dir: Path):
        self.key = NodeKey.load_or_create(data_dir / "coordinator.key")
        self.store = Store(data_dir / "state.db")
        self.governor = Governor(self.store, self.key, {})
        self.close(0, [])

    def join(self, node_id: str, round_: int) -> None:
        terms = self.governor.terms
        self.governor.ledger.grant(node_id, round=round_, terms=terms)
        self.governor.ledger.post_stake(node_id, round=round_, terms=terms)

    def decide(self, node_id: str, round_: int, **overrides) -> object:
        return self.governor.check_update(round_, node_id, {**GOOD_UPDATE, **overrides})

    def close(self, round_: int, decided: list[tuple[UpdateRecord, object]]) -> None:
        """Commit round `round_` with its decided updates: (record with quality_ppm and aggregated, decision)."""
        self.governor.settle(round_, [UpdateOutcome(u.node_id, d, u.tokens, u.quality_ppm, u.aggregated)
                                      for u, d in decided])  # fmt: skip
        self.governor.boundary(round_)
        head = self.governor.ledger.head if round_ else ""
        model_hash = f"{round_:064x}"
        record = RoundRecord(round_, model_hash, f"round-{round_:06d}.ckpt", "0" * 64, 2.0, len(decided), 0, 0, 0,
                             1.0, 2.0, 3.0, head, self.key.sign(round_record_bytes(round_, model_hash, head)))
        books = self.governor.snapshot()
        self.store.commit_round(record, [u for u, _ in decided], books["ledger"], self.governor.ledger.balances(),
                                books["meta"])
        self.governor.committed()


def update(node_id: str, round_: int, quality_ppm: int, aggregated: bool = True, accepted: bool = True,
           tokens: int = 1_000) -> UpdateRecord:
    return UpdateRecord(round_, node_id, accepted, "", tokens, 5, 3.0, 2.0, 4000, 1.0, 1.5, quality_ppm, aggregated)


@pytest.fixture
def books(tmp_path) -> Books:
    """Rounds 0-2: alice and bob join under round 0; round 1 pays alice (bob's update, discarded by the
    aggregator, earns nothing) and round 2 pays both."""
    b = Books(tmp_path)
    alice, bob = NodeKey().node_id, NodeKey().node_id
    b.alice, b.bob = alice, bob
    b.join(alice, 0)
    b.join(bob, 0)
    b.close(1, [(update(alice, 0, 800_000), b.decide(alice, 0)),
                (update(bob, 0, 300_000, aggregated=False), b.decide(bob, 0))])
    b.close(2, [(update(alice, 1, 1_000_000), b.decide(alice, 1)),
                (update(bob, 1, 600_000, tokens=512), b.decide(bob, 1))])
    return b


def test_honest_books_pass_the_audit(books):
    kinds = [e["kind"] for e in books.store.ledger_entries()]
    assert kinds == ["grant", "stake", "grant", "stake", "reward", "reward", "reward"]
    assert audit_books(books.store, books.key.node_id) == []


def test_an_overpayment_rehashed_and_resigned_by_the_coordinator_fails_the_reward_formula(books, tmp_path):
    rewrite_books(tmp_path / "state.db", overpay, sign_with=books.key)
    (failure,) = audit_books(Store(tmp_path / "state.db", read_only=True), books.key.node_id)
    assert failure.startswith("at entry 4:") and "does not follow the formula" in failure


def test_an_overpayment_signed_by_another_key_fails_the_round_signatures(books, tmp_path):
    rewrite_books(tmp_path / "state.db", overpay, sign_with=NodeKey())
    failures = audit_books(Store(tmp_path / "state.db", read_only=True), books.key.node_id)
    assert any(f.startswith("round 0 (and 2 later rounds): the record does not carry") for f in failures)
    assert any("does not follow the formula" in f for f in failures)


def test_a_dropped_last_entry_with_the_balances_and_head_rewritten_fails_the_signature(books, tmp_path):
    rewrite_books(tmp_path / "state.db", lambda entries: entries[:-1])
    failures = audit_books(Store(tmp_path / "state.db", read_only=True), books.key.node_id)
    assert failures[0].startswith("round 2: the record does not carry")  # (and bob's last reward is missing)


def test_a_dropped_last_entry_resigned_by_the_coordinator_leaves_an_update_unpaid(books, tmp_path):
    rewrite_books(tmp_path / "state.db", lambda entries: entries[:-1], sign_with=books.key)
    (failure,) = audit_books(Store(tmp_path / "state.db", read_only=True), books.key.node_id)
    assert f"update of {books.bob} committed with round 2" in failure and "never paid" in failure


def test_a_clean_leave_returns_the_stake_when_the_round_closes_after_its_slash(books):
    stake = books.governor.ledger.stake_of(books.bob)
    books.governor.leave(books.bob)  # after sending an update that breaks a slash rule
    books.close(3, [(update(books.bob, 2, 0, accepted=False, aggregated=False),
                     books.decide(books.bob, 2, loss=float("nan")))])
    slash, unstake = books.store.ledger_entries()[-2:]
    assert (slash["kind"], unstake["kind"]) == ("slash", "unstake")
    assert unstake["postings"] == [[f"stake:{books.bob}", -(stake // 2)], [books.bob, stake // 2]]
    assert books.governor.ledger.stake_of(books.bob) == 0
    assert audit_books(books.store, books.key.node_id) == []


def test_a_node_back_before_the_round_closes_keeps_its_stake_posted(books):
    stake = books.governor.ledger.stake_of(books.alice)
    books.governor.leave(books.alice)
    assert books.governor.admit(books.alice, 2).allowed
    books.close(3, [])
    assert "unstake" not in [e["kind"] for e in books.store.ledger_entries()]
    assert books.governor.ledger.stake_of(books.alice) == stake
