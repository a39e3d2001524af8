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
from server.store import Store
from shared.governance import Change, Decision, Governance, GovernanceError, Proposal, Vote
from shared.rewards import (InsufficientFunds, Ledger, LedgerEntry, Reputation, RewardTerms, receipt_bytes,
                            settle_update)

JOIN_WINDOW_S = 60.0

# job parameters that the command line sets for a new job (names as governance knows them)
GOVERNED_FROM_CLI = ("inner_steps", "lr", "batch", "aggregator", "deadline_seconds", "outer_lr", "outer_momentum")


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


class Governor:
    def __init__(self, store: Store, key: NodeKey, initial_params: dict, rules_toml: str | None = None):
        """`rules_toml` (a rulebook like shared/default_rules.toml) seeds a new job's governance; a job that
        already has governance in the store keeps it: from then on only votes change the rules."""
        self.store = store
        self.key = key
        stored = store.get_meta("governance")
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
        self.ledger = Ledger.from_entries(store.ledger_entries())
        self.reputation = Reputation.from_dict(store.get_meta("reputation") or {})
        self._committed_entries = len(self.ledger.entries)
        self._joins: deque[float] = deque()

    @property
    def params(self) -> dict:
        return self.governance.params

    @property
    def terms(self) -> RewardTerms:
        return RewardTerms.from_params(self.governance.params)

    # -- admission -----------------------------------------------------------------------------------------

    def admit(self, node_id: str, round_: int) -> Decision:
        """Check the admission rules; if allowed, grant a new node its start credit and post its stake."""
        now = time.time()
        while self._joins and now - self._joins[0] > JOIN_WINDOW_S:
            self._joins.popleft()
        decision = self.governance.validate(
            "admission", {"node_id": node_id, "joins_last_minute": len(self._joins), "reputation": self.reputation[node_id]},
            round=round_, subject=node_id)
        if not decision.allowed:
            return decision
        self._joins.append(now)
        terms = self.terms
        self.ledger.grant(node_id, round=round_, terms=terms)
        self.ledger.post_stake(node_id, round=round_, terms=terms)  # InsufficientFunds propagates: refuse
        return decision

    # -- updates -------------------------------------------------------------------------------------------

    def check_update(self, round_: int, node_id: str, params: dict) -> Decision:
        return self.governance.validate("update", params, round=round_, subject=node_id,
                                        detail={k: v for k, v in params.items() if isinstance(v, (int, float, str))})

    def settle(self, round_: int, outcomes: list[UpdateOutcome]) -> list[LedgerEntry]:
        """Book every decided update of a round: rewards, slashes and reputation."""
        entries: list[LedgerEntry] = []
        terms = self.terms
        for o in outcomes:
            entries += settle_update(self.ledger, self.reputation, o.node_id, o.decision, round=round_, terms=terms,
                                     tokens=o.tokens, quality=o.quality_ppm, aggregated=o.aggregated)
        return entries

    def sign_receipt(self, entry: LedgerEntry) -> str:
        return self.key.sign(receipt_bytes(entry))

    # -- proposals and votes ---------------------------------------------------------------------------------

    def propose(self, proposal: Proposal) -> dict:
        state = self.governance.propose(proposal)
        self.store.set_meta("governance", self.governance.to_dict())  # a proposal is durable once accepted
        return state.to_dict()

    def vote(self, vote: Vote) -> None:
        self.governance.vote(vote)
        self.store.set_meta("governance", self.governance.to_dict())

    def boundary(self, round_: int) -> list[Change]:
        """At the boundary that opens `round_`: apply the proposals that passed. Committed with the round."""
        if round_ <= self.governance.boundary:
            return []
        return self.governance.apply_passed(round_, self.reputation.weights())

    # -- persistence -------------------------------------------------------------------------------------------

    def uncommitted_entries(self) -> list[LedgerEntry]:
        return self.ledger.entries[self._committed_entries :]

    def snapshot(self) -> dict:
        """What the store writes with the round: new ledger entries and the governance/reputation state."""
        return {"ledger": [e.to_dict() for e in self.uncommitted_entries()],
                "meta": {"governance": self.governance.to_dict(), "reputation": self.reputation.to_dict()}}

    def committed(self) -> None:
        self._committed_entries = len(self.ledger.entries)

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
