"""Audit log, signing bytes, proposals, reputation-weighted votes, changes at round boundaries, and who may
propose and vote at the coordinator (server/coordinator/governor.py, with a real store)."""

import dataclasses
import json
import sqlite3
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.coordinator.governor import Governor
from server.coordinator.job import JobConfig
from server.keys import NodeKey
from server.coordinator.store import Store
from shared.governance import (
    MAX_OPEN_PROPOSALS_PER_NODE,
    MAX_VOTES_PER_NODE_PER_ROUND,
    AuditLog,
    Governance,
    GovernanceError,
    NotEligibleError,
    Proposal,
    ProposalError,
    ProposalState,
    SignatureError,
    Vote,
    VoteError,
    canonical_json,
    signing_bytes,
    tally,
)
from shared.rewards import Reputation
from tests.test_store import record

FAST = settings(max_examples=60, deadline=None, database=None)
GOOD_UPDATE = {"pseudo_gradient_norm": 3.0, "loss": 2.0, "numel": 10, "expected_numel": 10,
               "updates_this_round": 0, "staleness": 0, "tokens": 100}


def blocked_log(n: int) -> AuditLog:
    g = Governance.default()
    for i in range(n):
        g.validate("update", {**GOOD_UPDATE, "pseudo_gradient_norm": 1e3 + i}, round=i, subject=f"node-{i}")
    return g.audit


# ---- canonical and signing bytes ----


def test_canonical_json_is_sorted_and_compact_and_refuses_nan():
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == b'{"a":[1.5,"\\u00e9"],"b":1}'
    with pytest.raises(GovernanceError, match="canonical"):
        canonical_json({"x": float("nan")})


def test_signing_bytes_carry_a_domain_so_signatures_cannot_cross_kinds():
    p = Proposal("alice", "set_param", {"name": "lr", "value": 0.001}, round=3)
    assert p.signing_bytes().startswith(b"swarmgrad/v1/proposal\n")
    assert p.signing_bytes() == signing_bytes("proposal", p.body())
    v = Vote(p.id, "bob", True, 3)
    assert v.signing_bytes().startswith(b"swarmgrad/v1/vote\n")
    assert json.loads(v.signing_bytes().split(b"\n", 1)[1]) == v.body()
    # the signature is not part of what is signed, nor of the proposal's id
    assert Proposal(**{**p.__dict__, "signature": "abc"}).id == p.id


# ---- the audit log ----


def test_only_blocking_decisions_are_audited():
    g = Governance.default()
    g.validate("update", GOOD_UPDATE, round=1, subject="ok-node")
    assert g.audit.entries == []
    g.validate("update", {**GOOD_UPDATE, "pseudo_gradient_norm": float("nan")}, round=1, subject="bad-node",
               detail={"norm": float("nan")})
    (entry,) = g.audit.entries
    assert entry.subject == "bad-node" and entry.action == "update"
    assert set(entry.rule_ids) == {"finite-values", "norm-bound"}
    assert entry.detail == {"norm": "nan", "slash": True}
    assert g.audit.verify() is None


@FAST
@given(n=st.integers(1, 8), data=st.data())
def test_audit_log_detects_an_edited_entry(n, data):
    log = blocked_log(n)
    i = data.draw(st.integers(0, n - 1))
    d = log.to_list()
    d[i]["subject"] = "someone-else"
    assert AuditLog.from_list(d).verify() == i


@FAST
@given(n=st.integers(2, 8), data=st.data())
def test_audit_log_detects_dropped_and_reordered_entries(n, data):
    log = blocked_log(n)
    d = log.to_list()
    i = data.draw(st.integers(0, n - 2))
    dropped = d[:i] + d[i + 1 :]
    assert AuditLog.from_list(dropped).verify() == i
    swapped = list(d)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    assert AuditLog.from_list(swapped).verify() == i


def test_audit_log_detects_a_rehashed_edit_by_the_broken_link():
    d = blocked_log(3).to_list()
    d[1]["subject"] = "x"
    tampered = AuditLog.from_list(d)
    forged = tampered.entries[1]
    d[1]["hash"] = forged.compute_hash()  # the forger fixes the entry's own hash...
    assert AuditLog.from_list(d).verify() == 2  # ...and the next entry's link gives it away


# ---- tally: quorum and threshold, exactly ----


def votes_for(pid, ballots):
    return [Vote(pid, node, approve, 0) for node, approve in ballots.items()]


PID = "a" * 64


def test_exactly_at_threshold_passes_and_just_below_fails():
    rep = {"a": 2, "b": 1}
    at = tally(PID, votes_for(PID, {"a": True, "b": False}), rep, Fraction(1, 2), Fraction(2, 3))
    assert (at.yes_weight, at.voted_weight) == (2, 3) and at.threshold_met and at.passed
    below = tally(PID, votes_for(PID, {"a": True, "b": False}), {"a": 2, "b": 1, "c": 0}, Fraction(1, 2),
                  Fraction(3, 4))
    assert not below.threshold_met and not below.passed


def test_exactly_at_quorum_passes_and_just_below_fails():
    rep = {"a": 1, "b": 1, "c": 1, "d": 1}
    at = tally(PID, votes_for(PID, {"a": True, "b": True}), rep, Fraction(1, 2), Fraction(1, 2))
    assert at.quorum_met and at.passed
    below = tally(PID, votes_for(PID, {"a": True}), rep, Fraction(1, 2), Fraction(1, 2))
    assert not below.quorum_met and below.threshold_met and not below.passed


def test_no_votes_and_zero_reputation_never_pass():
    none = tally(PID, [], {"a": 5}, Fraction(1, 2), Fraction(1, 2))
    assert not none.quorum_met and not none.threshold_met and not none.passed
    zero = tally(PID, votes_for(PID, {"a": True}), {"a": 0, "b": -7}, Fraction(1, 100), Fraction(1, 100))
    assert zero.total_weight == 0 and not zero.passed


def test_negative_reputation_and_unknown_voters_weigh_nothing():
    t = tally(PID, votes_for(PID, {"a": True, "bad": False, "stranger": False}), {"a": 3, "bad": -50},
              Fraction(1, 2), Fraction(1, 2))
    assert (t.total_weight, t.voted_weight, t.yes_weight) == (3, 3, 3) and t.passed


@FAST
@given(rep=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(-5, 50), max_size=8),
       ballots=st.dictionaries(st.sampled_from("abcdefgh"), st.booleans(), max_size=8),
       q=st.fractions(min_value=Fraction(1, 20), max_value=1, max_denominator=20),
       t=st.fractions(min_value=Fraction(1, 20), max_value=1, max_denominator=20))
def test_tally_matches_fraction_arithmetic(rep, ballots, q, t):
    result = tally(PID, votes_for(PID, ballots), rep, q, t)
    w = {n: max(0, r) for n, r in rep.items()}
    total = sum(w.values())
    voted = sum(w.get(n, 0) for n in ballots)
    yes = sum(w.get(n, 0) for n, ok in ballots.items() if ok)
    expected = total > 0 and voted > 0 and Fraction(voted, total) >= q and Fraction(yes, voted) >= t
    assert result.passed == expected


# ---- proposals take effect only at the next boundary ----


def lr_proposal(value=0.001, round=5, proposer="alice"):
    return Proposal(proposer, "set_param", {"name": "lr", "value": value}, round=round)


def test_a_passed_proposal_changes_the_config_only_at_the_next_boundary():
    g = Governance.default()
    rep = {"alice": 10, "bob": 10, "carol": 1}
    p = g.propose(lr_proposal(round=5), current_round=5).proposal
    g.vote(Vote(p.id, "alice", True, 5), current_round=5)
    g.vote(Vote(p.id, "bob", True, 5), current_round=5)
    assert g.tally(p.id, rep).passed
    assert g.params["lr"] == 0.0003  # passed, but round 5 is still running
    changes = g.apply_passed(6, rep)
    assert [(c.target, c.before, c.after, c.round) for c in changes] == [("lr", 0.0003, 0.001, 6)]
    assert g.params["lr"] == 0.001 and g.round_config()["lr"] == 0.001
    assert g.proposals[p.id].status == "applied" and g.proposals[p.id].decided_round == 6
    assert g.audit.entries[-1].kind == "change" and g.audit.verify() is None


def test_votes_cast_during_the_boundary_round_wait_for_the_following_boundary():
    g = Governance.default()
    rep = {"alice": 1}
    p = g.propose(lr_proposal(round=5), current_round=5).proposal
    g.vote(Vote(p.id, "alice", True, 6), current_round=6)  # cast while round 6 runs
    assert g.apply_passed(6, rep) == []
    assert [c.target for c in g.apply_passed(7, rep)] == ["lr"]


def test_boundaries_only_move_forward():
    g = Governance.default()
    g.apply_passed(3, {})
    with pytest.raises(GovernanceError, match="already processed"):
        g.apply_passed(3, {})


def test_unpassed_proposals_expire_after_the_voting_window():
    g = Governance.default()
    p = g.propose(lr_proposal(round=1), current_round=1).proposal
    g.vote(Vote(p.id, "alice", True, 1), current_round=1)
    rep = {"alice": 1, "bob": 10}  # quorum not reached
    g.apply_passed(1 + g.voting_rounds, rep)
    assert g.proposals[p.id].status == "open"
    g.apply_passed(2 + g.voting_rounds, rep)
    assert g.proposals[p.id].status == "expired"
    with pytest.raises(VoteError, match="expired"):
        g.vote(Vote(p.id, "bob", True, 30), current_round=30)


def test_rule_proposals_add_change_and_remove_rules():
    g = Governance.default()
    rep = {"a": 1}
    new_rule = {"id": "max-loss", "action": "update", "reason": "loss above 20 means divergence",
                "condition": {"param": "loss", "op": "<=", "value": 20.0}}
    deny = g.rules.get("deny-list").to_dict()
    deny["condition"]["value"] = ["mallory"]
    proposals = [Proposal("a", "add_rule", {"rule": new_rule}, 1),
                 Proposal("a", "change_rule", {"rule": deny}, 1),
                 Proposal("a", "remove_rule", {"rule_id": "tokens-positive"}, 1)]
    for p in proposals:
        g.propose(p, current_round=1)
        g.vote(Vote(p.id, "a", True, 1), current_round=1)
    changes = g.apply_passed(2, rep)
    assert sorted(c.kind for c in changes) == ["add_rule", "change_rule", "remove_rule"]
    assert "tokens-positive" not in g.rules and "max-loss" in g.rules
    assert g.validate("admission", {"node_id": "mallory", "joins_last_minute": 0, "reputation": 0},
                      round=2, subject="mallory").blocked_by == ["deny-list"]


@pytest.mark.parametrize("proposal, fragment", [
    (Proposal("a", "set_param", {"name": "lr", "value": 0.5}, 1), "lr-ceiling"),
    (Proposal("a", "set_param", {"name": "unknown_knob", "value": 1}, 1), "existing job parameter"),
    (Proposal("a", "set_param", {"name": "inner_steps", "value": 2.5}, 1), "is int"),
    (Proposal("a", "set_param", {"name": "aggregator", "value": "bogus"}, 1), "known-aggregator"),
    (Proposal("a", "remove_rule", {"rule_id": "no-such-rule"}, 1), "no such rule"),
    (Proposal("a", "add_rule", {"rule": {"id": "lr-ceiling", "action": "update", "reason": "r",
                                         "condition": {"param": "x", "op": "finite"}}}, 1), "already exists"),
    (Proposal("a", "add_rule", {"rule": {"id": "x", "action": "update", "reason": "r",
                                         "condition": {"param": "x", "op": "exec", "value": 1}}}, 1), "unknown op"),
    (Proposal("a", "grant_me_money", {}, 1), "kind"),
    (Proposal("a", "set_param", {"name": "lr"}, 1), "payload"),
])
def test_bad_proposals_are_refused_and_leave_no_trace(proposal, fragment):
    g = Governance.default()
    before = g.to_dict()
    with pytest.raises(GovernanceError, match=fragment):
        g.propose(proposal, current_round=1)
    assert g.to_dict() == before


def test_a_proposal_that_no_longer_applies_at_the_boundary_fails_without_harm():
    g = Governance.default()
    first = g.propose(Proposal("a", "remove_rule", {"rule_id": "tokens-positive"}, 1), current_round=1).proposal
    second = g.propose(Proposal("a", "remove_rule", {"rule_id": "tokens-positive"}, 1, note="again"),
                       current_round=1).proposal
    for p in (first, second):
        g.vote(Vote(p.id, "a", True, 1), current_round=1)
    changes = g.apply_passed(2, {"a": 1})
    assert len(changes) == 1
    statuses = sorted(g.proposals[p.id].status for p in (first, second))
    assert statuses == ["applied", "failed"]


def test_votes_are_one_per_node_and_only_on_open_proposals():
    g = Governance.default()
    p = g.propose(lr_proposal(round=2), current_round=2).proposal
    g.vote(Vote(p.id, "bob", False, 2), current_round=2)
    with pytest.raises(VoteError, match="already voted"):
        g.vote(Vote(p.id, "bob", True, 2), current_round=2)
    with pytest.raises(VoteError, match="no proposal"):
        g.vote(Vote("f" * 64, "bob", True, 2), current_round=2)
    with pytest.raises(VoteError, match="predates"):
        g.vote(Vote(p.id, "carol", True, 1), current_round=1)
    with pytest.raises(ProposalError, match="already exists"):
        g.propose(lr_proposal(round=2), current_round=2)


def test_signatures_are_checked_when_a_verifier_is_given():
    def verify(signer, message, signature):
        return signature == f"{signer}:{len(message)}"

    g = Governance.default(verify_signature=verify)
    p = lr_proposal(round=1)
    with pytest.raises(SignatureError):
        g.propose(p, current_round=1)
    signed = Proposal(**{**p.__dict__, "signature": f"alice:{len(p.signing_bytes())}"})
    g.propose(signed, current_round=1)
    v = Vote(signed.id, "bob", True, 1)
    with pytest.raises(SignatureError):
        g.vote(v, current_round=1)
    g.vote(Vote(**{**v.__dict__, "signature": f"bob:{len(v.signing_bytes())}"}), current_round=1)


def test_governance_round_trips_through_json():
    g = Governance.default()
    p = g.propose(lr_proposal(round=1), current_round=1).proposal
    g.vote(Vote(p.id, "alice", True, 1), current_round=1)
    g.validate("update", {**GOOD_UPDATE, "staleness": 4}, round=1, subject="late-node")
    g.apply_passed(2, {"alice": 3})
    restored = Governance.from_dict(json.loads(json.dumps(g.to_dict())))
    assert restored.to_dict() == g.to_dict()
    assert restored.params["lr"] == 0.001 and restored.boundary == 2
    assert restored.audit.verify() is None
    with pytest.raises(ProposalError, match="does not match"):
        Proposal.from_dict({**p.to_dict(), "payload": {"name": "lr", "value": 0.002}})


def test_round_config_refuses_an_override_that_breaks_a_rule():
    g = Governance.default()
    assert g.round_config(deadline_seconds=30.0)["deadline_seconds"] == 30.0
    with pytest.raises(GovernanceError, match="deadline-range"):
        g.round_config(deadline_seconds=1.0)


def test_a_proposal_voted_down_is_rejected_at_the_end_of_its_window():
    g = Governance.default()
    p = g.propose(lr_proposal(round=1), current_round=1).proposal
    g.vote(Vote(p.id, "alice", True, 1), current_round=1)
    g.vote(Vote(p.id, "bob", False, 1), current_round=1)
    g.apply_passed(2 + g.voting_rounds, {"alice": 1, "bob": 1})  # quorum met, 1/2 < 2/3
    assert g.proposals[p.id].status == "rejected" and g.params["lr"] == 0.0003


def test_mutating_a_payload_after_proposing_changes_nothing():
    g = Governance.default()
    payload = {"name": "lr", "value": 0.001}
    p = Proposal("alice", "set_param", payload, 1)
    pid = g.propose(p, current_round=1).proposal.id
    payload["value"] = 0.5
    assert g.proposals[pid].proposal.payload == {"name": "lr", "value": 0.001}
    assert g.proposals[pid].proposal.id == pid


# ---- round stamps and per-node limits: what one signer can spend ----


@pytest.mark.parametrize("stamp", [9, 10, 11])
def test_a_proposal_stamped_within_a_round_of_the_current_one_is_accepted(stamp):
    g = Governance.default()
    p = g.propose(lr_proposal(round=stamp), current_round=10).proposal
    assert g.proposals[p.id].status == "open"


@pytest.mark.parametrize("stamp", [8, 12, 10**15])
def test_a_proposal_stamped_further_from_the_current_round_is_refused(stamp):
    g = Governance.default()
    with pytest.raises(ProposalError, match=f"stamped round {stamp}, but the current round is 10"):
        g.propose(lr_proposal(round=stamp), current_round=10)
    assert g.proposals == {}


@pytest.mark.parametrize("stamp", [8, 12, 10**15])
def test_a_vote_stamped_further_from_the_current_round_is_refused(stamp):
    g = Governance.default()
    p = g.propose(lr_proposal(round=10), current_round=10).proposal
    with pytest.raises(VoteError, match=f"stamped round {stamp}, but the current round is 10"):
        g.vote(Vote(p.id, "bob", True, stamp), current_round=10)
    assert g.proposals[p.id].votes == {}


def test_one_proposer_keeps_at_most_four_proposals_open_and_locks_out_nobody_else():
    g = Governance.default()
    for i in range(MAX_OPEN_PROPOSALS_PER_NODE):
        g.propose(Proposal("alice", "set_param", {"name": "lr", "value": 0.001}, 5, note=str(i)), current_round=5)
    with pytest.raises(ProposalError, match=f"already has {MAX_OPEN_PROPOSALS_PER_NODE} open proposals"):
        g.propose(Proposal("alice", "set_param", {"name": "lr", "value": 0.002}, 5), current_round=5)
    g.propose(lr_proposal(round=5, proposer="bob"), current_round=5)
    # once alice's proposals are decided (here: expired unvoted), she may propose again
    g.apply_passed(6 + g.voting_rounds, {})
    g.propose(Proposal("alice", "set_param", {"name": "lr", "value": 0.002}, 26), current_round=26)
    assert sum(s.status == "open" for s in g.proposals.values()) == 1


def test_a_node_casts_at_most_64_votes_stamped_with_one_round():
    g = Governance.default()
    proposals = [g.propose(Proposal(f"proposer-{i // 4}", "set_param", {"name": "lr", "value": 0.001}, 10,
                                    note=str(i)), current_round=10).proposal
                 for i in range(MAX_VOTES_PER_NODE_PER_ROUND + 2)]  # fmt: skip
    for p in proposals[:MAX_VOTES_PER_NODE_PER_ROUND]:
        g.vote(Vote(p.id, "voter", True, 10), current_round=10)
    with pytest.raises(VoteError, match=f"already cast {MAX_VOTES_PER_NODE_PER_ROUND} votes in round 10"):
        g.vote(Vote(proposals[-2].id, "voter", True, 10), current_round=10)
    assert "voter" not in g.proposals[proposals[-2].id].votes
    g.vote(Vote(proposals[-1].id, "voter", True, 11), current_round=11)  # the next round has its own allowance


def test_an_open_proposal_stamped_far_ahead_by_older_code_expires_at_the_next_boundary():
    g = Governance.default()
    far, edge = ProposalState(lr_proposal(round=10**15)), ProposalState(lr_proposal(round=1 + g.voting_rounds))
    g.restore_proposals([far, edge])  # as a store written before stamps were checked may hold them
    g.apply_passed(1, {})
    assert g.proposals[far.proposal.id].status == "expired"
    assert g.proposals[edge.proposal.id].status == "open"  # within the voting window of the boundary


# ---- the coordinator's governor: who may propose and vote, and one row per proposal and vote ----


def signed_proposal(key: NodeKey, round_: int, value: float = 0.001) -> Proposal:
    p = Proposal(key.node_id, "set_param", {"name": "lr", "value": value}, round_)
    return dataclasses.replace(p, signature=key.sign(p.signing_bytes()))


def signed_vote(key: NodeKey, proposal_id: str, round_: int) -> Vote:
    v = Vote(proposal_id, key.node_id, True, round_)
    return dataclasses.replace(v, signature=key.sign(v.signing_bytes()))


def admitted(governor: Governor, reputation: int) -> NodeKey:
    key = NodeKey()
    governor.store.touch_node(key.node_id, "trainer")
    governor.reputation = Reputation({**governor.reputation.snapshot(), key.node_id: reputation})
    return key


@pytest.fixture
def governor(tmp_path) -> Governor:
    return Governor(Store(tmp_path / "state.db"), NodeKey(), {})


def test_a_never_admitted_key_may_neither_propose_nor_vote(governor):
    stranger = NodeKey()
    with pytest.raises(NotEligibleError, match="only admitted nodes may propose"):
        governor.propose(signed_proposal(stranger, 0), current_round=0)
    proposal_id = governor.propose(signed_proposal(admitted(governor, 5), 0), current_round=0)["proposal"]["id"]
    with pytest.raises(NotEligibleError, match="only admitted nodes may vote"):
        governor.vote(signed_vote(stranger, proposal_id, 0), current_round=0)
    assert governor.governance.proposals[proposal_id].votes == {}


@pytest.mark.parametrize("reputation, allowed", [(1, True), (0, False), (-201, False)])
def test_an_admitted_node_may_propose_only_with_accepted_work(governor, reputation, allowed):
    # joining is free: a fresh key (reputation 0) could otherwise fill the 128 open-proposal slots
    proposal = signed_proposal(admitted(governor, reputation), 0)
    if allowed:
        governor.propose(proposal, current_round=0)
    else:
        with pytest.raises(NotEligibleError, match="only nodes with accepted work may propose"):
            governor.propose(proposal, current_round=0)
    assert (proposal.id in governor.governance.proposals) is allowed


@pytest.mark.parametrize("reputation", [0, -3])
def test_an_admitted_node_without_accepted_work_may_not_vote(governor, reputation):
    proposal_id = governor.propose(signed_proposal(admitted(governor, 5), 0), current_round=0)["proposal"]["id"]
    with pytest.raises(NotEligibleError, match="only nodes with accepted work may vote"):
        governor.vote(signed_vote(admitted(governor, reputation), proposal_id, 0), current_round=0)


def test_a_proposal_and_a_vote_are_one_row_each_and_leave_the_governance_state_alone(governor):
    alice = admitted(governor, 5)
    governance_before = governor.store.get_meta("governance")
    proposal_id = governor.propose(signed_proposal(alice, 0), current_round=0)["proposal"]["id"]
    governor.vote(signed_vote(alice, proposal_id, 0), current_round=0)
    with sqlite3.connect(governor.store.path) as db:
        assert db.execute("SELECT id, status FROM proposals").fetchall() == [(proposal_id, "open")]
        assert db.execute("SELECT proposal_id, voter, approve, round FROM votes").fetchall() == [
            (proposal_id, alice.node_id, 1, 0)]
    assert governor.store.get_meta("governance") == governance_before


def test_a_boundary_decision_is_committed_with_the_round_and_survives_a_restart(tmp_path, governor):
    alice = admitted(governor, 5)
    proposal_id = governor.propose(signed_proposal(alice, 0), current_round=0)["proposal"]["id"]
    governor.vote(signed_vote(alice, proposal_id, 0), current_round=0)
    assert [c.target for c in governor.boundary(1)] == ["lr"]
    books = governor.snapshot()
    assert [(p["id"], p["status"], p["decided_round"]) for p in books["proposals"]] == [(proposal_id, "applied", 1)]
    assert "proposals" not in books["meta"]["governance"]  # they live in their own table
    governor.store.commit_round(record(1), [], books["ledger"], governor.ledger.balances(), books["meta"],
                                books["proposals"])
    governor.committed()
    restarted = Governor(Store(tmp_path / "state.db"), NodeKey(), {})
    state = restarted.governance.proposals[proposal_id]
    assert (state.status, set(state.votes)) == ("applied", {alice.node_id})
    assert restarted.params["lr"] == 0.001


def test_a_job_started_under_the_old_outer_momentum_keeps_it_and_a_new_job_gets_the_new_default(tmp_path):
    # the default outer momentum went from 0.9 to 0.5 (bench/README.md, "The outer step"); a running job's
    # governed value is its own, and only a vote changes it
    old = Governance.default()
    old.params = old.round_config(outer_momentum=0.9)
    store = Store(tmp_path / "old.db")
    store.set_meta("governance", old.to_dict())  # a job's books, written while 0.9 was the default
    assert Governor(store, NodeKey(), JobConfig().governed()).params["outer_momentum"] == 0.9
    new_job = Governor(Store(tmp_path / "new.db"), NodeKey(), JobConfig().governed())
    assert new_job.params["outer_momentum"] == Governance.default().params["outer_momentum"] == 0.5


def test_proposals_in_an_older_governance_blob_move_into_their_tables_on_first_load(tmp_path):
    alice = NodeKey()
    old = Governance.default()
    proposal_id = old.propose(signed_proposal(alice, 3), current_round=3).proposal.id
    old.vote(signed_vote(alice, proposal_id, 3), current_round=3)
    store = Store(tmp_path / "state.db")
    store.set_meta("governance", old.to_dict())  # as a coordinator wrote it before proposals had rows
    governor = Governor(store, NodeKey(), {})
    assert set(governor.governance.proposals[proposal_id].votes) == {alice.node_id}
    assert "proposals" not in store.get_meta("governance")
    (stored,) = store.proposals()
    assert stored["proposal"]["id"] == proposal_id and [v["voter"] for v in stored["votes"]] == [alice.node_id]

