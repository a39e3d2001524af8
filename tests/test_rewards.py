"""The reward ledger: conservation, recomputation from the log, tamper detection, receipts, reputation."""

import dataclasses
import json
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.governance import Change, Governance
from shared.rewards import (
    FEES,
    MINT,
    PPM,
    SLASHED,
    InsufficientFunds,
    Ledger,
    LedgerEntry,
    LedgerError,
    Posting,
    Reputation,
    RewardTerms,
    check_anchors,
    check_chain,
    check_receipt,
    check_rewards,
    params_in_force,
    quality_to_ppm,
    receipt_bytes,
    reward_amounts,
    round_record_bytes,
    settle_update,
    stake_account,
    terms_by_round,
    verify_chain,
)
from tests.conftest import ROOT

FAST = settings(max_examples=40, deadline=None, database=None)
TERMS = RewardTerms(micro_per_token=3, fee_ppm=50_000, stake_micro=1_000, initial_grant_micro=2_500, slash_ppm=500_000)
NODES = ["n0", "n1", "n2"]

node = st.sampled_from(NODES)
operation = st.one_of(
    st.tuples(st.just("grant"), node),
    st.tuples(st.just("stake"), node),
    st.tuples(st.just("unstake"), node),
    st.tuples(st.just("reward"), node, st.integers(0, 5_000), st.integers(0, PPM)),
    st.tuples(st.just("slash"), node),
    st.tuples(st.just("transfer"), node, node, st.integers(1, 3_000)),
)


def run(ops) -> Ledger:
    """Apply operations in order; a refused one must leave the ledger exactly as it was."""
    ledger = Ledger()
    for r, op in enumerate(ops):
        before = (ledger.to_list(), ledger.balances())
        try:
            if op[0] == "grant":
                ledger.grant(op[1], round=r, terms=TERMS)
            elif op[0] == "stake":
                ledger.post_stake(op[1], round=r, terms=TERMS)
            elif op[0] == "unstake":
                ledger.release_stake(op[1], round=r)
            elif op[0] == "reward":
                ledger.reward(op[1], tokens=op[2], quality=op[3], round=r, terms=TERMS)
            elif op[0] == "slash":
                ledger.slash(op[1], round=r, terms=TERMS, rule_ids=["norm-bound"])
            else:
                ledger.append("transfer", [(op[1], -op[3]), (op[2], op[3])], round=r, node=op[1])
        except LedgerError:
            assert (ledger.to_list(), ledger.balances()) == before
    return ledger


busy_ledger = st.lists(operation, min_size=3, max_size=25).map(run).filter(lambda led: len(led.entries) >= 2)


@FAST
@given(ledger=st.lists(operation, max_size=25).map(run))
def test_every_transaction_conserves_money_and_so_does_the_whole_ledger(ledger):
    for e in ledger.entries:
        credits = sum(p.amount for p in e.postings if p.amount > 0)
        debits = -sum(p.amount for p in e.postings if p.amount < 0)
        assert credits == debits > 0
    assert sum(ledger.balances().values()) == 0
    assert all(v > 0 for acct, v in ledger.balances().items() if acct != MINT)


@FAST
@given(ledger=st.lists(operation, max_size=25).map(run))
def test_balances_recomputed_from_the_log_equal_the_stored_ones(ledger):
    stored = json.loads(json.dumps(ledger.to_list()))
    assert check_chain(stored, head=ledger.head, balances=ledger.balances()) is None
    assert Ledger.from_list(stored).balances() == ledger.balances()


@FAST
@given(ledger=busy_ledger, data=st.data())
def test_an_edited_entry_is_detected_at_its_index(ledger, data):
    entries = ledger.to_list()
    i = data.draw(st.integers(0, len(entries) - 1))
    field = data.draw(st.sampled_from(["round", "node", "memo", "amount", "kind"]))
    e = entries[i]
    if field == "round":
        e["round"] += 1
    elif field == "node":
        e["node"] = "mallory"
    elif field == "memo":
        e["memo"] = {**e["memo"], "forged": True}
    elif field == "amount":  # still zero-sum, so only the hash and the balances can tell
        e["postings"][0][1] -= 1
        e["postings"][1][1] += 1
    else:
        e["kind"] = "grant" if e["kind"] != "grant" else "reward"
    assert verify_chain(entries, head=ledger.head) == i


@FAST
@given(ledger=busy_ledger, data=st.data())
def test_an_edit_is_caught_even_when_the_forger_rehashes_the_chain(ledger, data):
    entries = [LedgerEntry.from_dict(d) for d in ledger.to_list()]
    i = data.draw(st.integers(0, len(entries) - 1))
    e = entries[i]
    legs = list(e.postings)
    legs[0] = Posting(legs[0].account, legs[0].amount - 1)
    legs[1] = Posting(legs[1].account, legs[1].amount + 1)
    entries[i] = dataclasses.replace(e, postings=tuple(legs))
    prev = entries[i - 1].hash if i else "0" * 64
    for k in range(i, len(entries)):  # re-link and re-hash everything after the edit
        entries[k] = dataclasses.replace(entries[k], prev=prev)
        entries[k] = dataclasses.replace(entries[k], hash=entries[k].compute_hash())
        prev = entries[k].hash
    # caught by the recorded post-balances (or, if the edit overdraws an account, by the replay itself)
    assert verify_chain(entries) == i


@FAST
@given(ledger=busy_ledger, data=st.data())
def test_a_dropped_entry_is_detected_at_its_index(ledger, data):
    entries = ledger.to_list()
    i = data.draw(st.integers(0, len(entries) - 1))
    dropped = entries[:i] + entries[i + 1 :]
    # dropping the newest entry leaves a valid shorter chain: only the anchor (head or balances) shows it
    assert verify_chain(dropped, head=ledger.head) == i
    assert verify_chain(dropped, balances=ledger.balances()) == i


@FAST
@given(ledger=busy_ledger, data=st.data())
def test_reordered_entries_are_detected_at_the_first_moved_index(ledger, data):
    entries = ledger.to_list()
    i = data.draw(st.integers(0, len(entries) - 2))
    j = data.draw(st.integers(i + 1, len(entries) - 1))
    entries[i], entries[j] = entries[j], entries[i]
    assert verify_chain(entries) == i


def test_a_tampered_balance_table_is_reported():
    ledger = run([("grant", "n0"), ("stake", "n0")])
    assert verify_chain(ledger.entries, balances={**ledger.balances(), "n0": 10**6}) == 2
    with pytest.raises(LedgerError, match="entry 0"):
        Ledger.from_list([{**ledger.to_list()[0], "round": 9}] + ledger.to_list()[1:])


# ---- the economics ----


def test_grant_stake_reward_fee_slash_and_unstake_move_exact_amounts():
    ledger = Ledger()
    ledger.grant("n1", round=0, terms=TERMS)
    assert ledger.grant("n1", round=1, terms=TERMS) is None  # once per node
    ledger.post_stake("n1", round=0, terms=TERMS)
    assert ledger.balances() == {MINT: -2_500, "n1": 1_500, stake_account("n1"): 1_000}
    r = ledger.reward("n1", tokens=1_000, quality=Fraction(1, 2), round=1, terms=TERMS, memo={"update": "u1"})
    assert r.memo["gross"] == 1_500 and r.memo["fee"] == 75 and r.memo["update"] == "u1"
    assert ledger.balance("n1") == 1_500 + 1_425 and ledger.balance(FEES) == 75
    s = ledger.slash("n1", round=2, terms=TERMS, rule_ids=["finite-values"])
    assert s.memo["rule_ids"] == ["finite-values"]
    assert ledger.stake_of("n1") == 500 and ledger.balance(SLASHED) == 500
    ledger.post_stake("n1", round=3, terms=TERMS)  # tops the escrow back up
    assert ledger.stake_of("n1") == 1_000
    ledger.release_stake("n1", round=4)
    assert ledger.stake_of("n1") == 0 and sum(ledger.balances().values()) == 0
    assert verify_chain(ledger.entries, head=ledger.head, balances=ledger.balances()) is None


def test_reward_terms_come_from_the_governed_params():
    terms = RewardTerms.from_params(Governance.default().params)
    assert terms == RewardTerms(micro_per_token=1, fee_ppm=50_000, stake_micro=1_000_000,
                                initial_grant_micro=2_000_000, slash_ppm=500_000)
    with pytest.raises(LedgerError, match="fee_ppm"):
        RewardTerms.from_params({"fee_ppm": 1.5})


@FAST
@given(tokens=st.integers(0, 10**9), quality=st.integers(0, PPM), fee_ppm=st.integers(0, PPM))
def test_reward_is_floor_of_tokens_times_quality_and_fee_never_exceeds_it(tokens, quality, fee_ppm):
    gross, fee = reward_amounts(tokens, quality, RewardTerms(micro_per_token=7, fee_ppm=fee_ppm))
    assert gross == tokens * 7 * quality // PPM
    assert fee == gross * fee_ppm // PPM and 0 <= fee <= gross


def test_quality_converts_exactly_and_clamps():
    assert quality_to_ppm(0.5) == 500_000
    assert quality_to_ppm(Fraction(1, 3)) == 333_333
    assert quality_to_ppm(-0.2) == 0 and quality_to_ppm(3.0) == PPM
    assert quality_to_ppm(float("nan")) == 0 and quality_to_ppm(float("inf")) == 0
    with pytest.raises(LedgerError, match="ppm"):
        reward_amounts(10, 0.5, TERMS)  # floats must go through quality_to_ppm first
    with pytest.raises(LedgerError, match=r"\[0, 1\]"):
        reward_amounts(10, PPM + 1, TERMS)


@pytest.mark.parametrize("postings, error, fragment", [
    ([(MINT, -5), ("n1", 4)], LedgerError, "sum to -1"),
    ([(MINT, -5.0), ("n1", 5.0)], LedgerError, "integer"),
    ([(MINT, -5), ("n1", True)], LedgerError, "integer"),
    ([(MINT, -5)], LedgerError, "2 to"),
    ([(MINT, 0), ("n1", 0)], LedgerError, "zero posting"),
    ([("n1", -5), ("n1", 5)], LedgerError, "twice"),
    ([("n1", -5), ("n2", 5)], InsufficientFunds, "cannot pay"),
    ([(MINT, -5), ("stake:", 5)], LedgerError, "node id"),
    ([(MINT, -5), ("mint ", 5)], LedgerError, "node id"),
])
def test_bad_transactions_are_refused_and_change_nothing(postings, error, fragment):
    ledger = run([("grant", "n0")])
    before = (ledger.to_list(), ledger.balances())
    with pytest.raises(error, match=fragment):
        ledger.append("transfer", postings, round=1)
    assert (ledger.to_list(), ledger.balances()) == before


def test_a_slash_must_name_its_rules():
    ledger = run([("grant", "n0"), ("stake", "n0")])
    with pytest.raises(LedgerError, match="rule ids"):
        ledger.slash("n0", round=1, terms=TERMS, rule_ids=[])


# ---- receipts ----


def test_a_receipt_verifies_offline_and_an_edited_one_does_not():
    ledger = run([("grant", "n0"), ("stake", "n0"), ("reward", "n0", 1_000, PPM)])
    entry = json.loads(json.dumps(ledger.entries[-1].to_dict()))
    assert receipt_bytes(entry).startswith(b"swarmgrad/v1/receipt\n")
    assert receipt_bytes(entry) == receipt_bytes(ledger.entries[-1])
    assert check_receipt(entry, "n0").hash == ledger.entries[-1].hash
    with pytest.raises(LedgerError, match="not about"):
        check_receipt(entry, "n1")
    entry["postings"][1][1] += 1
    entry["postings"][0][1] -= 1
    with pytest.raises(LedgerError, match="hash"):
        check_receipt(entry, "n0")


# ---- reputation ----


def test_reputation_is_earned_by_accepted_updates_and_lost_by_bad_ones():
    rep = Reputation()
    assert rep["new"] == 0
    assert rep.record("good", "accepted", PPM) == 10
    assert rep.record("good", "accepted", 0) == 11  # even a useless accepted update earns a point
    assert rep.record("lazy", "discarded") == -2
    assert rep.record("sloppy", "rejected") == -20
    rep.record("attacker", "slashed")
    rep.record("attacker", "slashed")
    assert rep["attacker"] == -200
    assert rep.weights() == {"attacker": 0, "good": 11, "lazy": 0, "sloppy": 0}
    assert rep.below(-100) == ["attacker"]
    assert Reputation.from_dict(json.loads(json.dumps(rep.to_dict()))).snapshot() == rep.snapshot()
    with pytest.raises(LedgerError, match="outcome"):
        rep.record("good", "bribed")


# ---- settling an update ----


def test_settling_updates_books_reward_slash_or_only_reputation():
    g = Governance.default()
    ledger, rep = run([("grant", "n0"), ("stake", "n0"), ("grant", "n1"), ("stake", "n1")]), Reputation()
    good = {"pseudo_gradient_norm": 3.0, "loss": 2.0, "numel": 10, "expected_numel": 10,
            "updates_this_round": 0, "staleness": 0, "tokens": 1_000}
    ok = g.validate("update", good, round=1, subject="n0")
    (reward,) = settle_update(ledger, rep, "n0", ok, round=1, terms=TERMS, tokens=1_000, quality=PPM)
    assert reward.kind == "reward" and rep["n0"] == 10
    assert settle_update(ledger, rep, "n0", ok, round=1, terms=TERMS, aggregated=False) == [] and rep["n0"] == 8
    nan = g.validate("update", {**good, "loss": float("nan")}, round=1, subject="n1")
    (slash,) = settle_update(ledger, rep, "n1", nan, round=1, terms=TERMS)
    assert slash.memo["rule_ids"] == ["finite-values"] and ledger.balance(SLASHED) == 500 and rep["n1"] == -100
    late = g.validate("update", {**good, "staleness": 3}, round=1, subject="n1")
    assert settle_update(ledger, rep, "n1", late, round=1, terms=TERMS) == [] and rep["n1"] == -120
    assert g.audit.verify() is None and len(g.audit.entries) == 2
    assert verify_chain(ledger.entries, head=ledger.head, balances=ledger.balances()) is None
    with pytest.raises(LedgerError, match="update decisions"):
        settle_update(ledger, rep, "n1", g.validate("storage", {"checkpoints_kept": 1}, round=1, subject="s"),
                      round=1, terms=TERMS)


def test_a_rehashed_reward_with_a_different_split_is_named_by_its_balances():
    ledger = run([("grant", "n0"), ("stake", "n0"), ("reward", "n0", 1_000, PPM)])
    entries = list(ledger.entries)
    e = entries[2]
    legs = (e.postings[0], Posting("n0", e.postings[1].amount + 50), Posting(FEES, e.postings[2].amount - 50))
    forged = dataclasses.replace(e, postings=legs)
    entries[2] = dataclasses.replace(forged, hash=forged.compute_hash())
    fault = check_chain(entries)
    assert fault.index == 2 and "balances" in fault.reason


# ---- auditing a job: signed round anchors, rewards recomputed from their updates, a stranger's verifier ----


def reforge(entries) -> Ledger:
    """What a forger does after editing entries: rebuild every hash and post-balance so that the chain checks."""
    forged = Ledger()
    for e in entries:
        forged.append(e.kind, e.postings, round=e.round, node=e.node, memo=e.memo)
    return forged


def update_record(node: str, committed_round: int, tokens: int, quality_ppm: int, aggregated: bool = True) -> dict:
    return {"node_id": node, "round": committed_round - 1, "committed_round": committed_round, "accepted": True,
            "aggregated": aggregated, "tokens": tokens, "quality_ppm": quality_ppm}


def paid_round() -> tuple[Ledger, list[dict]]:
    """n0 and n1 admitted under round 0; round 1 commits n0's update, n1's update and n1's late one (both paid),
    an n0 update of quality 0 (nothing to pay) and an accepted update of n2 that the aggregator discarded."""
    ledger = run([("grant", "n0"), ("stake", "n0"), ("grant", "n1"), ("stake", "n1")])
    updates = [update_record("n0", 1, 1_000, PPM), update_record("n1", 1, 2_000, 250_000),
               update_record("n1", 1, 700, 500_000), update_record("n0", 1, 900, 0),
               update_record("n2", 1, 500, PPM, aggregated=False)]
    for u in updates:
        if u["aggregated"]:
            ledger.reward(u["node_id"], tokens=u["tokens"], quality=u["quality_ppm"], round=1, terms=TERMS)
    return ledger, updates


def test_every_reward_is_recomputed_from_the_update_it_pays():
    ledger, updates = paid_round()
    assert [e.kind for e in ledger.entries].count("reward") == 3
    assert check_rewards(ledger.to_list(), updates, {0: TERMS, 1: TERMS}) is None
    assert check_rewards(ledger.entries, updates, {1: TERMS}) is None


def test_a_rehashed_overpayment_passes_the_chain_but_not_the_reward_formula():
    ledger, updates = paid_round()
    entries = list(ledger.entries)
    i = next(k for k, e in enumerate(entries) if e.kind == "reward")
    e = entries[i]
    gross = e.memo["gross"] + 500
    entries[i] = dataclasses.replace(e, memo={**e.memo, "gross": gross},
                                     postings=(Posting(MINT, -gross), Posting("n0", e.postings[1].amount + 500),
                                               e.postings[2]))
    forged = reforge(entries)
    assert check_chain(forged.entries, balances=forged.balances()) is None  # the chain alone cannot tell
    fault = check_rewards(forged.entries, updates, {1: TERMS})
    assert fault.index == i
    assert "does not follow the formula" in fault.reason and "gross 3000" in fault.reason


def test_a_reward_must_pay_one_update_of_its_node_and_round_and_every_such_update_is_paid():
    ledger, updates = paid_round()
    entries = ledger.to_list()
    first_reward = next(k for k, e in enumerate(entries) if e["kind"] == "reward")
    terms = {1: TERMS, 2: TERMS}
    fault = check_rewards(entries, updates[1:], terms)  # n0's update record is gone
    assert fault.index == first_reward and "pays no accepted, aggregated update" in fault.reason
    moved = [LedgerEntry.from_dict(e) for e in entries]
    moved[first_reward] = dataclasses.replace(moved[first_reward], round=2)  # booked under another round
    assert check_rewards(reforge(moved).entries, updates, terms).index == first_reward
    claimed = [LedgerEntry.from_dict(e) for e in entries]
    claimed[first_reward] = dataclasses.replace(claimed[first_reward],
                                                memo={**claimed[first_reward].memo, "tokens": 1_001})
    assert "pays no" in check_rewards(reforge(claimed).entries, updates, terms).reason
    unpaid = [LedgerEntry.from_dict(e) for k, e in enumerate(entries) if k != first_reward]
    fault = check_rewards(reforge(unpaid).entries, updates, terms)
    assert fault.index == len(unpaid) and "n0 committed with round 1" in fault.reason and "never paid" in fault.reason
    assert "no round record" in check_rewards(entries, updates, {2: TERMS}).reason


def test_the_terms_of_a_round_undo_the_changes_that_took_effect_at_or_after_it():
    g = Governance.default()
    params = {**g.params, "fee_ppm": 100_000, "reward_micro_per_token": 2}
    g.audit.append_change(Change("p1", "set_param", "fee_ppm", 50_000, 100_000, 3))
    g.audit.append_change(Change("p2", "add_rule", "some-rule", None, {"id": "some-rule"}, 4))
    g.audit.append_change(Change("p3", "set_param", "reward_micro_per_token", 1, 2, 5))
    audit = g.audit.to_list()
    # a change of round r is applied at the boundary after round r's rewards were booked
    assert params_in_force(params, audit, 3)["fee_ppm"] == 50_000
    assert params_in_force(params, audit, 4)["fee_ppm"] == 100_000
    terms = terms_by_round(params, audit, range(7))
    assert [(terms[r].fee_ppm, terms[r].micro_per_token) for r in (0, 3, 4, 5, 6)] == [
        (50_000, 1), (50_000, 1), (100_000, 1), (100_000, 1), (100_000, 2)]
    with pytest.raises(LedgerError, match="does not lead to the value in force"):
        params_in_force({**params, "fee_ppm": 70_000}, audit, 0)


def test_signed_round_heads_anchor_the_end_of_the_log():
    ledger, _ = paid_round()
    entries = ledger.to_list()
    heads = [(0, ""), (1, entries[3]["hash"]), (2, entries[-1]["hash"])]
    assert check_anchors(entries, heads) is None
    assert check_anchors([], [(0, ""), (1, "0" * 64)]) is None
    fault = check_anchors(entries[:-1], heads)  # the last entry dropped, the heads as signed
    assert fault.index == len(entries) - 1 and "not the hash of any entry" in fault.reason
    fault = check_anchors(entries, heads[:2])  # entries after the last signed head: no round committed them
    assert fault.index == 4 and "no signed round commits" in fault.reason
    fault = check_anchors(entries, [(1, entries[-1]["hash"]), (2, entries[3]["hash"])])
    assert "points back" in fault.reason


def test_round_records_are_signed_over_round_model_hash_and_ledger_head_only():
    signed = round_record_bytes(3, "ab" * 32, "cd" * 32)
    assert signed == (b"swarmgrad/v1/round\n" + b'{"ledger_head":"' + b"cd" * 32 + b'","model_hash":"' + b"ab" * 32
                      + b'","round":3}')
    assert len({signed, round_record_bytes(4, "ab" * 32, "cd" * 32), round_record_bytes(3, "ab" * 32, "")}) == 3


def ledger_md_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "LEDGER.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_a_stranger_verifies_receipts_and_round_records_with_the_code_in_docs_ledger_md():
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    (code,) = ledger_md_blocks("python")
    stranger: dict = {}
    exec(compile(code, "docs/LEDGER.md", "exec"), stranger)  # only hashlib, json and cryptography, as the doc says
    (vector,) = [json.loads(block) for block in ledger_md_blocks("json")]
    coordinator_id, receipt = vector["coordinator_id"], vector["receipt"]
    entry, signature = receipt["entry"], receipt["signature"]
    stranger["verify_receipt"](entry, signature, coordinator_id)

    # this code hashes, signs and computes the amounts exactly as the stranger does
    coordinator = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the doc's test key: 0, 1, ..., 31
    public = coordinator.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public.hex() == coordinator_id
    assert check_receipt(entry, entry["node"]).hash == entry["hash"]
    assert coordinator.sign(receipt_bytes(entry)).hex() == signature  # ed25519 signatures are deterministic
    memo = entry["memo"]
    assert reward_amounts(memo["tokens"], Fraction(memo["quality"]), RewardTerms()) == (memo["gross"], memo["fee"])
    assert stranger["reward_amounts"](6144, 750_000, 1, 50_000) == (4608, 230)
    for tokens, quality in [(1, PPM), (999_999, 333_333), (10**12, 1)]:
        assert stranger["reward_amounts"](tokens, quality, 3, 70_000) == reward_amounts(
            tokens, quality, RewardTerms(micro_per_token=3, fee_ppm=70_000))

    edited = {**entry, "postings": [["mint", -4609], entry["postings"][1], ["fees", 231]]}
    with pytest.raises(ValueError, match="hash"):
        stranger["verify_receipt"](edited, signature, coordinator_id)
    rehashed = {**edited, "hash": LedgerEntry.from_dict(edited).compute_hash()}
    with pytest.raises(InvalidSignature):
        stranger["verify_receipt"](rehashed, signature, coordinator_id)

    record = {"round": 1, "model_hash": "ab" * 32, "ledger_head": entry["hash"]}
    record["signature"] = coordinator.sign(round_record_bytes(**record)).hex()
    stranger["verify_round_record"](record, coordinator_id)
    with pytest.raises(InvalidSignature):
        stranger["verify_round_record"]({**record, "ledger_head": entry["prev"]}, coordinator_id)
