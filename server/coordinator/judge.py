"""Judging a round's accepted updates before they are aggregated, so that only distinct, verified work is paid:
near-copies are traced (copies.py), a sample is re-executed (spot_check.py), and what fails is overruled.

Never slash on suspicion alone: a copy that was not re-executed is paid nothing and leaves the aggregate, but only
an update that does not reproduce from its own assignment costs its sender stake.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from server.coordinator import copies, spot_check
from server.coordinator.governor import Governor
from server.coordinator.model_state import GlobalModel
from server.coordinator.open_round import DecidedUpdate, OpenRound
from server.corpus import Corpus
from shared.model import GPTConfig

log = logging.getLogger("swarmgrad.coordinator")

MAX_SPOT_CHECKS = 4  # re-executions a round at most: each costs the coordinator one node's training time


class Judge:
    """Judges one round at a time, in a worker thread. `verify_share` is the share of updates a keyed hash samples
    for re-execution (0 turns spot checks off); the key is fresh per process, so nodes cannot predict it."""

    def __init__(self, cfg: GPTConfig, corpus: Corpus, verify_share: float):
        self.cfg, self.corpus, self.verify_share = cfg, corpus, verify_share
        self._salt = secrets.token_bytes(32)

    def judge(self, rnd: OpenRound, accepted: list[DecidedUpdate], model: GlobalModel, governor: Governor) -> None:
        """Judge `accepted` (the round's accepted updates in arrival order, computed on or before `model`). An
        update that nearly copies an earlier one of the round (from another key) is a suspect; suspects, then each
        node's first update, then a sampled share are re-executed from their own assignments. One that does not
        reproduce is slashed, with the evidence; a suspect that was not re-executed is paid nothing and costs its
        sender reputation, while one that reproduces is honest agreement and stays. Overruled updates are no
        longer accepted (DecidedUpdate.overrule)."""
        found = copies.find_copies([a.values for a in accepted], [a.update.codec for a in accepted])
        kept = [a for i, a in enumerate(accepted) if i not in found]
        # (update, the one it copies, the measure)
        suspects = [(accepted[i], accepted[j], measure) for i, (j, measure) in sorted(found.items())]
        for a in self.spot_check_sample(rnd, kept, [s for s, _, _ in suspects], governor):
            verdict = self.spot_check(rnd, a, model)
            if verdict is None:
                continue
            if verdict.ok:
                a.verified = True
                continue
            self.overrule(rnd, a, governor, "spot-check", "the update does not reproduce from its assignment "
                          f"(cosine {verdict.cosine:.3f}, relative error {verdict.relative_error:.3f})", slash=True,
                          evidence={"spot_check": verdict.evidence})
        for a, original, measure in suspects:
            if not a.verified and a.accepted:
                self.overrule(rnd, a, governor, "distinct-work", f"a near-copy of the update of "
                              f"{original.node_id[:12]}… in this round ({measure})", slash=False,
                              evidence={"copy_of": original.node_id, "measure": measure})

    def spot_check(self, rnd: OpenRound, a: DecidedUpdate, model: GlobalModel) -> spot_check.Verdict | None:
        """Re-execute one update from its assignment and judge it; None when the check itself could not run (our
        failure, never the node's: the update then stays, unverified)."""
        u, seq = a.update, int(rnd.config["seq_len"])
        try:
            recomputed = spot_check.reexecute(
                self.cfg, model.params, self.corpus.shard(rnd.assignments[u.node_id]), u.node_id, u.round,
                u.inner_steps, u.tokens // (u.inner_steps * seq), seq, float(rnd.config["lr"]),
                float(rnd.config.get("weight_decay", 0.0)))
            return spot_check.judge(a.values, recomputed, u.codec)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.error("round %d: the spot check of %s could not run: %s", rnd.round + 1, u.node_id[:12], e)
            return None

    def spot_check_sample(self, rnd: OpenRound, kept: list[DecidedUpdate], suspects: list[DecidedUpdate],
                          governor: Governor) -> list[DecidedUpdate]:
        """Which updates to re-execute, at most MAX_SPOT_CHECKS a round, of those computed on this round's model
        (their start is at hand): suspected copies first, then the updates of nodes without reputation (a node's
        first verified update pays its start grant and earns its first voting weight), then those a keyed hash
        samples at the job's verify share. None when the share is 0."""
        if self.verify_share <= 0:
            return []
        on_time = [a for a in suspects + kept if a.update.round == rnd.round]
        first = [a for a in on_time if a in suspects or governor.reputation[a.node_id] <= 0]
        sampled = [a for a in on_time if a not in first and self.sampled(a)]
        return (first + sampled)[:MAX_SPOT_CHECKS]

    def sampled(self, a: DecidedUpdate) -> bool:
        digest = hashlib.sha256(self._salt + f"{a.node_id}:{a.update.round}".encode()).digest()
        return int.from_bytes(digest[:8], "little") < self.verify_share * 2**64

    def overrule(self, rnd: OpenRound, a: DecidedUpdate, governor: Governor, rule: str, reason: str, slash: bool,
                 evidence: dict) -> None:
        """Turn an update accepted on arrival into one blocked by `rule`, in its record and the audit log."""
        decision = a.overrule(rule, reason, slash, evidence)
        governor.governance.audit.append_decision(decision, round=rnd.round, subject=a.node_id, detail=evidence)
        log.warning("round %d: overruled the update of %s: [%s] %s", rnd.round + 1, a.node_id[:12], rule, reason)
