"""The coordinator's books survive any one update, copies are told apart from honest agreement, joining mints
nothing, and a round keeps one record per update: the Governor, the copy measure and the open round on real
values."""

from __future__ import annotations

import numpy as np

from server.coordinator.copies import COPY_COSINE, find_copies
from server.coordinator.governor import Governor, RecentJoins, UpdateOutcome
from server.coordinator.open_round import DecidedUpdate, OpenRound
from server.keys import NodeKey
from server.coordinator.store import Store
from shared.rules import Decision, Verdict
from shared.wire import Update

ALLOWED = Decision("update", (Verdict("finite-values", True, "", True),))


def governor(tmp_path) -> Governor:
    return Governor(Store(tmp_path / "state.db"), NodeKey(), {})


def test_an_entry_the_ledger_refuses_is_left_out_and_the_others_are_booked(tmp_path):
    g = governor(tmp_path)
    a, b = NodeKey().node_id, NodeKey().node_id
    entries = g.settle(1, [UpdateOutcome(a, ALLOWED, 10**13, 1_000_000, True),  # beyond MAX_TOKENS_PER_UPDATE
                           UpdateOutcome(b, ALLOWED, 1000, 1_000_000, True)])
    assert [e.node for e in entries if e.kind == "reward"] == [b]
    assert len(g.failures) == 1 and g.failures[0][0] == a and "tokens" in g.failures[0][1]
    assert g.ledger.balance(a) == 0 and g.reputation[a] == 0  # the refused entry changed nothing


def test_joining_mints_nothing_and_the_start_grant_waits_for_a_verified_update(tmp_path):
    g = governor(tmp_path)
    node = NodeKey().node_id
    assert g.admit(node, 0, address="127.0.0.1").allowed
    assert g.ledger.entries == []  # no faucet
    g.settle(1, [UpdateOutcome(node, ALLOWED, 1000, 1_000_000, True, verified=False)])
    assert [e.kind for e in g.ledger.entries] == ["reward"]  # paid for its tokens, but no grant yet
    g.settle(2, [UpdateOutcome(node, ALLOWED, 1000, 1_000_000, True, verified=True)])
    kinds = [e.kind for e in g.ledger.entries]
    assert kinds == ["reward", "reward", "grant", "stake"]  # the stake is posted from the grant at once
    assert g.ledger.stake_of(node) == g.terms.stake_micro


def test_voting_weight_waits_for_verified_work(tmp_path):
    g = governor(tmp_path)
    sybil, honest = NodeKey().node_id, NodeKey().node_id
    for r in range(1, 4):  # accepted, unchecked updates from a key that never had one verified
        g.settle(r, [UpdateOutcome(sybil, ALLOWED, 1000, 1_000_000, True, verified=False)])
    assert g.reputation[sybil] == 0 and g.reputation.weights().get(sybil, 0) == 0
    g.settle(4, [UpdateOutcome(honest, ALLOWED, 1000, 1_000_000, True, verified=True)])
    first = g.reputation[honest]
    g.settle(5, [UpdateOutcome(honest, ALLOWED, 1000, 1_000_000, True, verified=False)])  # sampled out later
    assert 0 < first < g.reputation[honest]


def test_joins_are_counted_per_address_and_a_returning_key_is_no_join(tmp_path):
    g = governor(tmp_path)
    for _ in range(60):
        assert g.admit(NodeKey().node_id, 0, address="10.0.0.1").allowed
    assert not g.admit(NodeKey().node_id, 0, address="10.0.0.1").allowed  # this address's new keys wait
    assert g.admit(NodeKey().node_id, 0, address="10.0.0.2").allowed  # nobody else does
    assert g.admit(NodeKey().node_id, 0, address="10.0.0.1", returning=True).allowed


def test_identical_updates_are_copies_and_honest_neighbours_are_not():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(10_000).astype(np.float32)
    neighbour = (base + rng.standard_normal(10_000).astype(np.float32)).astype(np.float32)  # cosine ~0.7
    dense = {"name": "fp32"}
    rows = [neighbour, base, base.copy(), base * 1.01 + 1e-3, np.zeros_like(base)]
    found = find_copies(rows, [dense] * len(rows))
    assert sorted(found) == [2, 3] and found[2][0] == found[3][0] == 1  # rescaled and nudged: still a copy of 1
    assert "cosine" in found[2][1] and COPY_COSINE == 0.99


def test_a_copy_of_a_copy_is_traced_to_the_original():
    rng = np.random.default_rng(2)
    original = rng.standard_normal(1000).astype(np.float32)
    assert find_copies([original, original.copy(), original.copy()], [{"name": "fp32"}] * 3) == {
        1: (0, "cosine 1.0000 > 0.99"), 2: (0, "cosine 1.0000 > 0.99")}


def test_a_topk_copy_with_new_values_is_caught_by_its_support():
    rng = np.random.default_rng(1)
    original = np.zeros(10_000, np.float32)
    support = rng.choice(10_000, 200, replace=False)
    original[support] = rng.standard_normal(200)
    forged = np.zeros_like(original)
    forged[support] = rng.standard_normal(200)  # same coordinates, unrelated values: cosine near 0
    honest = np.zeros_like(original)
    honest[rng.choice(10_000, 200, replace=False)] = rng.standard_normal(200)
    topk, fp32 = {"name": "topk"}, {"name": "fp32"}
    assert find_copies([original, forged], [topk, topk]) == {1: (0, "100.0% of the same coordinates > 95%")}
    assert find_copies([original, forged], [fp32, fp32]) == {}
    assert find_copies([original, honest], [topk, topk]) == {}


def test_recent_joins_count_within_the_window_and_forget_keys_gone_quiet():
    now = [0.0]
    joins = RecentJoins(window_s=60.0, clock=lambda: now[0])
    for i in range(1000):  # a thousand keys join once each
        joins.add(f"key-{i}")
    joins.add("key-0")
    assert joins.count("key-0") == 2 and joins.count("key-1") == 1 and len(joins) == 1000
    now[0] = 61.0
    assert joins.count("key-0") == 0 and len(joins) == 0  # a window later, nothing of them is held


def update(node_id: str, round_: int) -> Update:
    return Update(node_id, round_, "0" * 64, 512, 2, 3.0, 2.5, {"name": "fp32", "params": {}}, 4, 1, "0" * 64, 16,
                  "0" * 128)


def test_an_overruled_update_is_one_record_that_the_store_and_the_books_read_alike():
    node = NodeKey().node_id
    entry = DecidedUpdate(update(node, 3), 1.0, "", 16, np.ones(4, np.float32), ALLOWED)
    entry.overrule("distinct-work", "a near-copy", slash=False, evidence={"copy_of": "ab"})
    record, outcome = entry.record(), entry.outcome(trusted=True)
    assert not entry.accepted and entry.values is None  # its values leave with it
    assert (record.accepted, record.weight, record.reason) == (False, 0.0, "distinct-work: a near-copy")
    assert outcome.decision.blocked_by == ["distinct-work"] and not outcome.aggregated and not outcome.verified
    assert outcome.memo == {"copy_of": "ab"} and outcome.tokens == record.tokens == 512


def test_an_accepted_update_books_its_quality_and_a_protocol_refusal_is_recorded_but_never_booked():
    node = NodeKey().node_id
    accepted = DecidedUpdate(update(node, 3), 0.5, "", 16, np.ones(4, np.float32), ALLOWED)
    accepted.quality_ppm, accepted.aggregated = 250_000, True
    assert (accepted.record().quality_ppm, accepted.record().aggregated, accepted.record().weight) == (250_000, True,
                                                                                                       0.5)
    assert accepted.outcome(trusted=True).verified and not accepted.outcome(trusted=False).verified
    refused = DecidedUpdate(update(node, 4), 0.0, "claims: too many steps", 16)
    assert refused.outcome(trusted=True) is None and not refused.record().accepted


def test_a_round_decides_one_update_per_node_for_itself_and_one_late_one():
    node, other = NodeKey().node_id, NodeKey().node_id
    rnd = OpenRound(5, 0.0, 60.0, None)
    rnd.add(DecidedUpdate(update(node, 4), 0.5, "", 16, np.ones(4, np.float32), ALLOWED))
    assert rnd.decided(node, 4) and rnd.decided(node, 3)  # one late update a round, whichever round it was for
    assert not rnd.decided(node, 5) and not rnd.decided(other, 4)
    assert not rnd.decided(node, 6)  # an update for the round ahead (overlapped rounds) is never a late one
    blocked = Decision("update", (Verdict("norm-bound", False, "too large", False),))
    rnd.add(DecidedUpdate(update(node, 5), 0.0, "norm-bound: too large", 16, decision=blocked))
    assert rnd.decided(node, 5) and rnd.reported == {node}
    assert [u.update.round for u in rnd.accepted] == [4]
