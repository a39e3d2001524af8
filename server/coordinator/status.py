"""The coordinator's status view (GET /api/status, `python -m server status`): the job, the rounds committed, the
open round, intake's queues and every node the store knows, live or not.

Never change state here: the view only reads, so that polling it cannot alter a round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.coordinator.coordinator import Coordinator


def status(coordinator: Coordinator) -> dict:
    c, intake = coordinator, coordinator.intake
    rounds = c.store.rounds()
    nodes = []
    for node_id, n in {n["id"]: n for n in c.store.nodes()}.items():
        live = intake.sessions.get(node_id)
        state = live.state if live else "offline"
        if live and live.mode != "active":  # what its user chose: "paused" or "finishing"
            state = live.mode
        if node_id in c.policy.quarantined:
            state = "quarantined"
        traffic = intake.traffic.get(node_id)
        nodes.append({"id": node_id, "kind": n["kind"], "agent": n["agent"], "name": n["name"], "team": n["team"],
                      "state": state,
                      "path": live.link.path if live and live.link else None, "last_path": n["last_path"],
                      "updates_accepted": n["updates_accepted"], "updates_rejected": n["updates_rejected"],
                      "tokens": n["tokens"], "last_seen": n["last_seen"],
                      "tokens_per_second": intake.node_speed.get(node_id),
                      "reputation": c.governor.reputation[node_id],
                      "balance": c.governor.ledger.balance(node_id),
                      "stake": c.governor.ledger.stake_of(node_id),
                      # how its models came, as the node reports it (cumulative since it started)
                      "peers": traffic.peers if live and traffic else 0,
                      "bytes_from_peers": traffic.bytes_from_peers if traffic else 0,
                      "bytes_from_coordinator": traffic.bytes_from_coordinator if traffic else 0,
                      "bytes_to_peers": traffic.bytes_to_peers if traffic else 0,
                      # training time over wall time, its last rounds (intake.UTILISATION_ROUNDS), as it reports them
                      "utilisation": intake.utilisation(node_id)})
    last = rounds[-1] if rounds else None
    rnd = c.open_round
    open_round = None
    if rnd is not None:
        open_round = {"round": rnd.round, "deadline": rnd.deadline, "assigned": len(rnd.assignments),
                      "reported": len(rnd.reported)}
    ahead = c.next_round  # with overlapped rounds: open and trained while `open_round` collects
    next_round = None if ahead is None else {"round": ahead.round, "assigned": len(ahead.assignments)}
    return {
        "round": last.round if last is not None else 0,  # committed, as `history` lists them
        "settling": c.settling.checkpoint.round if c.settling is not None else None,  # closed, its books pending
        "current_round": c.round,  # the model's rounds, settling or not: what proposals and votes are stamped with
        "val_loss": None if last is None else last.val_loss,
        "model_hash": c.model_hash,
        "manifest": c.blobs.manifest_of(c.model_hash),  # the model's signed manifest, at /api/blobs/{manifest}
        "state": "finished" if c.finished else "training",
        "open_round": open_round,
        "next_round": next_round,
        "coordinator_id": c.key.node_id,
        "intake": {"pending_payloads": len(intake.pending), "deferred": len(intake.deferred),
                   "errors": c.intake_errors},
        "job": c.describe(),
        "peers": c.peers,  # the peer links the tracker advises per node (0: the star)
        "history": [{"round": r.round, "val_loss": r.val_loss, "accepted": r.accepted, "rejected": r.rejected,
                     "tokens": r.tokens, "bytes": r.bytes_received,
                     "coordinator_bytes_out": r.bytes_sent, "model_hash": r.model_hash,
                     "closed_at": r.closed_at} for r in rounds],
        "nodes": nodes,
    }
