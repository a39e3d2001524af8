"""A round while it is open: what it assigned, and one record per update it decided (this round's own, or a late
one computed for an earlier round), from which the round's close books the store, the ledger and the autonomy loop.

Never book one update twice: a (node, update round) pair has at most one record, and a record is overruled in
place, never copied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from server.coordinator.governor import UpdateOutcome
from server.coordinator.model_state import GlobalModel
from server.coordinator.store import UpdateRecord
from shared.agent import NodeReport
from shared.rules import Decision, Verdict
from shared.wire import Update


@dataclass(eq=False)  # one update is itself, never equal to another by value
class DecidedUpdate:
    """One update and everything the round decided about it.

    `values` are the decoded pseudo-gradient while the update is accepted (None once rejected or overruled, which
    frees them). `decision` is the rules' decision the books settle (None for a refusal on protocol grounds, which
    is recorded but never booked). `report` is what it said about its node's speed (accepted on arrival only).
    `quality_ppm` and `aggregated` are set at the close, and kept in the store so that `ledger verify` can
    recompute the reward.
    """

    update: Update
    weight: float  # 1, or STALE_WEIGHT for a late update; 0 when not accepted
    reason: str  # "rule: why" when not accepted
    nbytes: int
    values: np.ndarray | None = None
    decision: Decision | None = None
    report: NodeReport | None = None
    verified: bool = False  # re-executed by a spot check and found honest
    evidence: dict | None = None  # why it was overruled, booked with its ledger entry
    quality_ppm: int = 0
    aggregated: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def node_id(self) -> str:
        return self.update.node_id

    @property
    def key(self) -> tuple[str, int]:
        """(node id, the round the update was computed for): what one decision is kept per."""
        return self.update.node_id, self.update.round

    @property
    def accepted(self) -> bool:
        return self.values is not None

    def overrule(self, rule: str, reason: str, slash: bool, evidence: dict) -> Decision:
        """Turn an update accepted on arrival into one blocked by `rule`; returns the decision now booked for it."""
        self.decision = Decision("update", (Verdict(rule, False, reason, slash),))
        self.values, self.weight, self.reason, self.evidence = None, 0.0, f"{rule}: {reason}", evidence
        return self.decision

    def record(self) -> UpdateRecord:
        """The update's row in the store."""
        u = self.update
        return UpdateRecord(u.round, u.node_id, self.accepted, self.reason, u.tokens, u.inner_steps, u.loss_first,
                            u.loss_last, self.nbytes, self.weight, self.received_at, self.quality_ppm,
                            self.aggregated)

    def outcome(self, trusted: bool) -> UpdateOutcome | None:
        """What the books settle for it (None when there is no rules' decision to settle). `trusted`: accepted work
        counts as verified without a spot check (the job's checks are off)."""
        if self.decision is None:
            return None
        return UpdateOutcome(self.node_id, self.decision, self.update.tokens, self.quality_ppm,
                             self.accepted and self.aggregated, verified=self.accepted and (self.verified or trusted),
                             memo=self.evidence)


@dataclass(frozen=True)
class Assignments:
    """What a round gave out: its config, and each node's shard and when its assignment was sent."""

    opened_at: float
    config: dict
    model_hash: str  # the model the round trains on: an update for it names this one
    assignments: dict[str, int]  # shared with the OpenRound while it is open
    assigned_at: dict[str, float]


@dataclass
class OpenRound:
    """A round from its opening to its close. With overlapped rounds it opens (is announced, and nodes train it)
    while the round before still collects its updates; its own updates wait in intake until it collects."""

    round: int
    opened_at: float  # when it was announced; when it started collecting, for an overlapped round
    deadline: float
    base: GlobalModel  # the model it trains on, and its updates are judged and scored on (never written to)
    config: dict = field(default_factory=dict)  # the round config sent to nodes
    assignments: dict[str, int] = field(default_factory=dict)  # node id -> shard
    assigned_at: dict[str, float] = field(default_factory=dict)  # node id -> when its assignment was sent
    # (node id, update's round) -> its record, in the order decided: a late update and the node's update for this
    # round are two pieces of work
    updates: dict[tuple[str, int], DecidedUpdate] = field(default_factory=dict)
    bytes_received: int = 0
    bytes_sent_before: int = 0  # Coordinator.bytes_sent() when the round opened
    closing: bool = False  # aggregating and committing: updates that arrive now count in the next round
    advice: dict = field(default_factory=dict)  # node id -> its tracker.Advice (peers to dial, seed share)
    abandoned: bool = False  # opened on a model that could not be committed: it is not closed, its work not booked

    def assigned(self) -> Assignments:
        return Assignments(self.opened_at, self.config, self.base.hash, self.assignments, self.assigned_at)

    def decided(self, node_id: str, update_round: int) -> bool:
        """Whether this round decided an update of this node for `update_round`: its own round's, or a late one
        (a node gets one late decision a round, whichever earlier round its update was for). An update for a round
        ahead (overlapped rounds) is that round's, never a late one."""
        if update_round >= self.round:
            return (node_id, update_round) in self.updates
        return any(n == node_id and r < self.round for n, r in self.updates)

    def add(self, entry: DecidedUpdate) -> None:
        self.updates[entry.key] = entry

    @property
    def reported(self) -> set[str]:
        """The node ids whose update for this round was decided."""
        return {n for n, r in self.updates if r == self.round}

    @property
    def accepted(self) -> list[DecidedUpdate]:
        """The updates accepted so far, in arrival order (the order copies are traced and rows aggregated in)."""
        return [e for e in list(self.updates.values()) if e.accepted]

    @property
    def reports(self) -> list[NodeReport]:
        return [e.report for e in list(self.updates.values()) if e.report is not None]
