"""Audit log, signing bytes, proposals, reputation-weighted votes, and changes at round boundaries."""

import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.governance import (
    AuditLog,
    Governance,
    GovernanceError,
    Proposal,
    ProposalError,
    SignatureError,
    Vote,
    VoteError,
    canonical_json,
    signing_bytes,
    tally,
)

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
    p = g.propose(lr_proposal(round=5)).proposal
    g.vote(Vote(p.id, "alice", True, 5))
    g.vote(Vote(p.id, "bob", True, 5))
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
    p = g.propose(lr_proposal(round=5)).proposal
    g.vote(Vote(p.id, "alice", True, 6))  # cast while round 6 runs
    assert g.apply_passed(6, rep) == []
    assert [c.target for c in g.apply_passed(7, rep)] == ["lr"]


def test_boundaries_only_move_forward():
    g = Governance.default()
    g.apply_passed(3, {})
    with pytest.raises(GovernanceError, match="already processed"):
        g.apply_passed(3, {})


def test_unpassed_proposals_expire_after_the_voting_window():
    g = Governance.default()
    p = g.propose(lr_proposal(round=1)).proposal
    g.vote(Vote(p.id, "alice", True, 1))
    rep = {"alice": 1, "bob": 10}  # quorum not reached
    g.apply_passed(1 + g.voting_rounds, rep)
    assert g.proposals[p.id].status == "open"
    g.apply_passed(2 + g.voting_rounds, rep)
    assert g.proposals[p.id].status == "expired"
    with pytest.raises(VoteError, match="expired"):
        g.vote(Vote(p.id, "bob", True, 30))


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
        g.propose(p)
        g.vote(Vote(p.id, "a", True, 1))
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
        g.propose(proposal)
    assert g.to_dict() == before


def test_a_proposal_that_no_longer_applies_at_the_boundary_fails_without_harm():
    g = Governance.default()
    first = g.propose(Proposal("a", "remove_rule", {"rule_id": "tokens-positive"}, 1)).proposal
    second = g.propose(Proposal("a", "remove_rule", {"rule_id": "tokens-positive"}, 1, note="again")).proposal
    for p in (first, second):
        g.vote(Vote(p.id, "a", True, 1))
    changes = g.apply_passed(2, {"a": 1})
    assert len(changes) == 1
    statuses = sorted(g.proposals[p.id].status for p in (first, second))
    assert statuses == ["applied", "failed"]


def test_votes_are_one_per_node_and_only_on_open_proposals():
    g = Governance.default()
    p = g.propose(lr_proposal(round=2)).proposal
    g.vote(Vote(p.id, "bob", False, 2))
    with pytest.raises(VoteError, match="already voted"):
        g.vote(Vote(p.id, "bob", True, 2))
    with pytest.raises(VoteError, match="no proposal"):
        g.vote(Vote("f" * 64, "bob", True, 2))
    with pytest.raises(VoteError, match="predates"):
        g.vote(Vote(p.id, "carol", True, 1))
    with pytest.raises(ProposalError, match="already exists"):
        g.propose(lr_proposal(round=2))


def test_signatures_are_checked_when_a_verifier_is_given():
    def verify(signer, message, signature):
        return signature == f"{signer}:{len(message)}"

    g = Governance.default(verify_signature=verify)
    p = lr_proposal(round=1)
    with pytest.raises(SignatureError):
        g.propose(p)
    signed = Proposal(**{**p.__dict__, "signature": f"alice:{len(p.signing_bytes())}"})
    g.propose(signed)
    v = Vote(signed.id, "bob", True, 1)
    with pytest.raises(SignatureError):
        g.vote(v)
    g.vote(Vote(**{**v.__dict__, "signature": f"bob:{len(v.signing_bytes())}"}))


def test_governance_round_trips_through_json():
    g = Governance.default()
    p = g.propose(lr_proposal(round=1)).proposal
    g.vote(Vote(p.id, "alice", True, 1))
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
    p = g.propose(lr_proposal(round=1)).proposal
    g.vote(Vote(p.id, "alice", True, 1))
    g.vote(Vote(p.id, "bob", False, 1))
    g.apply_passed(2 + g.voting_rounds, {"alice": 1, "bob": 1})  # quorum met, 1/2 < 2/3
    assert g.proposals[p.id].status == "rejected" and g.params["lr"] == 0.0003


def test_mutating_a_payload_after_proposing_changes_nothing():
    g = Governance.default()
    payload = {"name": "lr", "value": 0.001}
    p = Proposal("alice", "set_param", payload, 1)
    pid = g.propose(p).proposal.id
    payload["value"] = 0.5
    assert g.proposals[pid].proposal.payload == {"name": "lr", "value": 0.001}
    assert g.proposals[pid].proposal.id == pid
