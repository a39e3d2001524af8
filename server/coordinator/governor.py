"""The coordinator's side of governance and rewards: the rules in force, proposals and votes, the ledger, and
reputation, decided with shared/governance.py and booked with shared/rewards.py.

Every change here is kept in memory until the coordinator commits the round that caused it, in one store
transaction with the round. Never book money or change a rule outside that path.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from server.keys import NodeKey, SignatureError, verify
from server.coordinator.store import Store
from shared.governance import (Change, Decision, Governance, GovernanceError, NotEligibleError, Proposal,
                               ProposalState, Vote)
from shared.rewards import (InsufficientFunds, Ledger, LedgerError, LedgerEntry, Reputation, RewardTerms, receipt_bytes,
                            settle_update)

JOIN_WINDOW_S = 60.0


class RecentJoins:
    """When each key (an address, a node id) joined within the last `window_s` seconds. Keys that have been quiet
    for a whole window are forgotten, so memory follows the recent joiners, never everyone ever seen."""

    def __init__(self, window_s: float = JOIN_WINDOW_S, clock=time.time):
        self.window_s, self.clock = window_s, clock
        self._times: dict[str, deque[float]] = {}
        self._swept = clock()

    def count(self, key: str) -> int:
        """Joins of `key` within the window."""
        now = self.clock()
        if now - self._swept > self.window_s:  # at most once a window: drop every key gone quiet
            self._times = {k: q for k, q in self._times.items() if now - q[-1] <= self.window_s}
            self._swept = now
        times = self._times.get(key)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) if times else 0

    def add(self, key: str) -> None:
        self._times.setdefault(key, deque()).append(self.clock())

    def __len__(self) -> int:
        return len(self._times)


def _verify_signature(signer: str, message: bytes, signature: str) -> bool:
    try:
        verify(signer, message, signature)
        return True
    except SignatureError:
        return False


@dataclass(frozen=True)
class UpdateOutcome:
    """What the round decided about one update, for the books."""

    node_id: str
    decision: Decision
    tokens: int
    quality_ppm: int
    aggregated: bool
    verified: bool = False  # re-executed by a spot check and found honest
    memo: dict | None = None  # evidence booked with the entry (a spot check's numbers, say)


class Governor:
    def __init__(self, store: Store, key: NodeKey, initial_params: dict, rules_toml: str | None = None):
        """`rules_toml` (a rulebook like shared/default_rules.toml) seeds a new job's governance; a job that
        already has governance in the store keeps it: from then on only votes change the rules."""
        self.store = store
        self.key = key
        stored = store.get_meta("governance")
        if stored is not None and "proposals" in stored:
            # written before proposals and votes had their own tables: move them there, once
            legacy = stored.pop("proposals")
            store.import_proposals(legacy, "governance", stored)
        if stored is None:
            if rules_toml is None:
                self.governance = Governance.default(verify_signature=_verify_signature)
            else:
                self.governance = Governance.from_toml(rules_toml, verify_signature=_verify_signature)
            unknown = set(initial_params) - set(self.governance.params)
            if unknown:
                raise GovernanceError(f"no job parameters named {sorted(unknown)}")
            # a new job starts from the command line's values, which must pass the round_config rules
            self.governance.params = self.governance.round_config(**initial_params)
        else:
            self.governance = Governance.from_dict(stored, verify_signature=_verify_signature)
        self.governance.restore_proposals(ProposalState.from_dict(s) for s in store.proposals())
        self._decided: list[dict] = []  # proposals a boundary decided, written with the round's commit
        self.ledger = Ledger.from_entries(store.ledger_entries())
        self.reputation = Reputation.from_dict(store.get_meta("reputation") or {})
        self._committed_entries = len(self.ledger.entries)
        self._joins = RecentJoins()  # address -> when new keys from it joined
        self.failures: list[tuple[str, str]] = []  # the last settle's refused entries: (node id, why)
        self._leaving: set[str] = set()  # nodes that left cleanly: their stake returns when the round closes

    @property
    def params(self) -> dict:
        return self.governance.params

    @property
    def terms(self) -> RewardTerms:
        return RewardTerms.from_params(self.governance.params)

    # -- admission -----------------------------------------------------------------------------------------

    def admit(self, node_id: str, round_: int, address: str = "", returning: bool = False) -> Decision:
        """Check the admission rules. Joins are counted per address, and a known key coming back is no join, so
        one peer's reconnects or key flood cannot lock out the others. Nothing is paid for joining: the start
        grant waits for the node's first verified update (settle), and its stake comes from there."""
        decision = self.governance.validate(
            "admission", {"node_id": node_id, "joins_last_minute": 0 if returning else self._joins.count(address),
                          "reputation": self.reputation[node_id]},
            round=round_, subject=node_id)
        if not decision.allowed:
            return decision
        self._leaving.discard(node_id)  # back before its round closed: the stake it holds stays posted
        if not returning:
            self._joins.add(address)
        return decision

    # -- updates -------------------------------------------------------------------------------------------

    def check_update(self, round_: int, node_id: str, params: dict) -> Decision:
        return self.governance.validate("update", params, round=round_, subject=node_id,
                                        detail={k: v for k, v in params.items() if isinstance(v, (int, float, str))})

    def settle(self, round_: int, outcomes: list[UpdateOutcome]) -> list[LedgerEntry]:
        """Book every decided update of a round: rewards, slashes and reputation; then return the stake of the
        nodes that left cleanly, after their own updates were judged, so that leaving cannot dodge a slash."""
        entries: list[LedgerEntry] = []
        self.failures = []
        terms = self.terms
        for o in outcomes:
            try:
                # voting weight only for verified work: a node earns reputation from an update that was verified,
                # or once an earlier verified one gave it some; a fresh key's unchecked updates earn it none
                booked = settle_update(self.ledger, self.reputation, o.node_id, o.decision, round=round_,
                                       terms=terms, tokens=o.tokens, quality=o.quality_ppm, aggregated=o.aggregated,
                                       memo=o.memo, earns_reputation=o.verified or self.reputation[o.node_id] > 0)
                if booked and booked[-1].kind == "reward":
                    booked += self._stake_from_earnings(o, round_, terms)
            except (LedgerError, GovernanceError) as e:
                # an entry the ledger refuses is left out, and the round commits without it: no input from a
                # node may stop the books (settle_update and the ledger change nothing when they refuse)
                self.failures.append((o.node_id, str(e)))
                continue
            entries += booked
        for node_id in sorted(self._leaving):
            entry = self.ledger.release_stake(node_id, round=round_)
            if entry is not None:
                entries.append(entry)
        self._leaving.clear()
        return entries

    def _stake_from_earnings(self, o: UpdateOutcome, round_: int, terms: RewardTerms) -> list[LedgerEntry]:
        """After a reward: the one-time start grant once the node's work was verified, then its stake topped up
        from what it holds. A key with no verified work holds nothing, so new keys mint nothing."""
        booked = []
        if o.verified:
            grant = self.ledger.grant(o.node_id, round=round_, terms=terms)
            booked += [grant] if grant is not None else []
        owed = terms.stake_micro - self.ledger.stake_of(o.node_id)
        if 0 < owed <= self.ledger.balance(o.node_id):
            stake = self.ledger.post_stake(o.node_id, round=round_, terms=terms)
            booked += [stake] if stake is not None else []
        return booked

    def leave(self, node_id: str) -> None:
        """A node said goodbye: its whole stake returns to it when the open round closes (in settle), booked
        and committed with that round. A dropped connection is no goodbye: that stake stays, to be slashed."""
        self._leaving.add(node_id)

    def sign_receipt(self, entry: LedgerEntry) -> str:
        return self.key.sign(receipt_bytes(entry))

    # -- proposals and votes ---------------------------------------------------------------------------------

    def propose(self, proposal: Proposal, current_round: int) -> dict:
        """Open a signed proposal from an admitted node whose reputation is at or above the admission floor,
        stamped with `current_round` (±1). Durable once accepted: one row in the store. Returns its state."""
        node = proposal.proposer
        if not self.store.is_known_node(node):
            raise NotEligibleError(f"only admitted nodes may propose; {node[:16]}… never joined this job")
        if self.reputation[node] <= 0 or not self._at_or_above_floor(self.reputation[node]):
            # joining is free, so a key without accepted work could fill the open-proposal slots: it may not
            raise NotEligibleError(f"only nodes with accepted work may propose; {node[:16]}… has reputation "
                                   f"{self.reputation[node]}")
        state = self.governance.propose(proposal, current_round=current_round,
                                        persist=lambda s: self.store.add_proposal(s.to_dict()))
        return state.to_dict()

    def vote(self, vote: Vote, current_round: int) -> None:
        """Record a signed vote from an admitted node with positive reputation (its weight), stamped with
        `current_round` (±1). Durable once recorded: one row in the store."""
        node = vote.voter
        if not self.store.is_known_node(node):
            raise NotEligibleError(f"only admitted nodes may vote; {node[:16]}… never joined this job")
        if self.reputation[node] <= 0:
            raise NotEligibleError(f"only nodes with accepted work may vote: {node[:16]}… has reputation "
                                   f"{self.reputation[node]}, so its vote would weigh nothing")
        self.governance.vote(vote, current_round=current_round, persist=lambda v: self.store.add_vote(v.to_dict()))

    def _at_or_above_floor(self, reputation: int) -> bool:
        """The admission rules' reputation floor (0 when no rule sets one)."""
        floor = self.governance.rules.bounds("admission", "reputation")
        if floor.low is None:
            return reputation >= 0
        return reputation >= floor.low if floor.low_inclusive else reputation > floor.low

    def boundary(self, round_: int) -> list[Change]:
        """At the boundary that opens `round_`: apply the proposals that passed. Committed with the round."""
        if round_ <= self.governance.boundary:
            return []
        open_before = self.governance.open_proposals()
        changes = self.governance.apply_passed(round_, self.reputation.weights())
        self._decided += [{"id": s.proposal.id, "status": s.status, "decided_round": s.decided_round,
                           "outcome": s.outcome} for s in open_before if s.status != "open"]  # fmt: skip
        return changes

    # -- persistence -------------------------------------------------------------------------------------------

    def uncommitted_entries(self) -> list[LedgerEntry]:
        return self.ledger.entries[self._committed_entries :]

    def snapshot(self) -> dict:
        """What the store writes with the round: new ledger entries, the governance/reputation state (proposals
        and votes have their own rows) and the status of the proposals the boundary decided."""
        return {"ledger": [e.to_dict() for e in self.uncommitted_entries()],
                "meta": {"governance": self.governance.to_dict(with_proposals=False),
                         "reputation": self.reputation.to_dict()},
                "proposals": list(self._decided)}

    def committed(self) -> None:
        self._committed_entries = len(self.ledger.entries)
        self._decided = []

    def describe(self) -> dict:
        g = self.governance
        weights = self.reputation.weights()
        proposals = []
        for state in sorted(g.proposals.values(), key=lambda s: (s.proposal.round, s.proposal.id)):
            item = state.to_dict()
            if state.status == "open":
                item["tally"] = g.tally(state.proposal.id, weights).to_dict()
            proposals.append(item)
        return {"rules": g.rules.to_list(), "params": g.params, "quorum": str(g.quorum), "threshold": str(g.threshold),
                "boundary": g.boundary, "proposals": proposals, "audit": g.audit.to_list()[-50:],
                "audit_length": len(g.audit.entries) if hasattr(g.audit, "entries") else None}


__all__ = ["Governor", "UpdateOutcome", "InsufficientFunds", "GovernanceError"]
