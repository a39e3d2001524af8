"""The coordinator: it wires one job's parts together and runs the round loop. A round opens with the strategy's
config, collects updates through intake until every assigned node reported or the deadline passed, then closes:
the judge, the strategy's aggregate and outer step and the new model's publication; the next round opens at once,
while the closed round's scores, validation loss, checkpoint and books settle and commit in one store transaction.

It knows nothing of transports (intake talks to sessions). Never commit a round before the one it follows, and never
keep a model the store could not commit: a failed settle takes the model back to the last commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.coordinator.blobs import BlobStore
from server.coordinator.checkpoint import Checkpoint, prune_checkpoints, write_checkpoint
from server.coordinator.governor import Governor
from server.coordinator.intake import Intake, NodeSession, Refusal
from server.coordinator.job import JobConfig, load_job, load_model
from server.coordinator.judge import Judge
from server.coordinator.model_state import GlobalModel
from server.coordinator.open_round import DecidedUpdate, OpenRound
from server.coordinator.status import status
from server.coordinator.store import RoundRecord, Store
from server.coordinator.strategy import RoundStrategy, overlapped
from server.coordinator.tracker import DEFAULT_PEERS, advise
from server.corpus import Corpus
from server.keys import NodeKey
from server.tokenizer import job_corpus
from shared import compress
from shared.agent import CoordinatorObservation, CoordinatorPolicy, standing
from shared.identity import signing_bytes
from shared.model import num_parameters, training_memory
from shared.rewards import round_record_bytes
from shared.wire import Bye, Error, Message, PayloadHeader, Receipt, RoundClosed

log = logging.getLogger("swarmgrad.coordinator")

DEADLINE_MARGIN = 2.0  # the deadline is this many times the 90th percentile of the nodes' round times
# fault injection for tests: seconds each settle waits before its work, so that a test can kill the process while
# a round settles
SETTLE_DELAY_ENV = "SWARMGRAD_FAULT_SETTLE_DELAY_S"


@dataclass(eq=False)
class Settle:
    """A closed round whose model is published and trained on, while its books settle: what `_settle` needs."""

    round: OpenRound
    accepted: list[DecidedUpdate]  # aggregated or not, in arrival order
    governed: dict  # the governed parameters the round closed with
    before: GlobalModel  # the model held before the round closed: a failed settle goes back to it
    checkpoint: Checkpoint  # the new model and momentum
    closed_at: float
    bytes_sent: int  # what the coordinator sent while the round was open
    residual_before: torch.Tensor | None  # the delta's residual before this round, for a take-back


class Coordinator:
    def __init__(self, data_dir: Path, job: JobConfig, corpus: Corpus, store: Store | None = None,
                 rules_toml: str | None = None, peers: int = DEFAULT_PEERS, ice_servers: Sequence[dict] = (),
                 settle_in_background: bool = True):
        self.data_dir = data_dir
        self.peers = peers  # peer links the tracker advises per node; 0 = the star (every byte from here)
        # STUN/TURN servers for every peer connection (RTCIceServer dictionaries, server.net.rtc.ice_server_list), from
        # `--ice-server`: a setting of this deployment, not of the stored job, so their credentials stay out of state.db
        self.ice_servers = tuple(ice_servers)
        self.store = store or Store(data_dir / "state.db")
        self.key = NodeKey.load_or_create(data_dir / "coordinator.key")
        self.corpus = corpus
        self.job = load_job(self.store, data_dir, corpus, job)
        corpus = self.corpus = job_corpus(self.store, data_dir, corpus, self.job)  # the job's token ids
        self.cfg = self.job.gpt_config()
        self.n_params = num_parameters(self.cfg)
        self.codec = compress.parse_codec(self.job.codec)
        self.governor = Governor(self.store, self.key, self.job.governed(), rules_toml)
        # a generous margin over the slowest nodes' round time: a deadline only cuts stragglers, and a tight one
        # makes every node cut its H (see TrainerPolicy), which costs more progress than waiting does
        self.policy = CoordinatorPolicy(lambda action, params: self.governor.governance.rules.validate(action, params),
                                        lambda: self.governor.governance.rules.bounds("round_config",
                                                                                      "deadline_seconds"),
                                        margin=DEADLINE_MARGIN, min_margin=DEADLINE_MARGIN, max_margin=3.0)
        self.deadline_seconds = float(self.governor.params["deadline_seconds"])
        self.strategy = RoundStrategy(self.job, self.cfg, self.codec, corpus)
        self.judge = Judge(self.cfg, corpus, self.job.verify_share)
        self.intake = Intake(self)
        self.finished = False
        self.intake_errors = 0  # settle and commit failures survived (each logged once, with its cause)
        self.changed = asyncio.Event()  # a session came or went, or an update was decided
        self.open_round: OpenRound | None = None  # the round that collects updates
        self.next_round: OpenRound | None = None  # with overlapped rounds: the one nodes train while it collects
        # the commit is off the critical path: the next round opens once the new model is published, and the
        # closed round's scores, validation loss and books settle meanwhile (False: each close waits for its settle)
        self.settle_in_background = settle_in_background
        self.settle_delay = float(os.environ.get(SETTLE_DELAY_ENV, "0") or 0)
        self.settling: Settle | None = None
        self.turnarounds: list[float] = []  # per round: seconds from the last update of the round before to its opening
        self._last_update_at: float | None = None
        self._settle_task: asyncio.Task | None = None
        self.model = load_model(self.store, data_dir, self.key, self.job, self.strategy)
        self.blobs = BlobStore(self.key)  # the model's chunks and signed manifest, for GET /api/blobs/{sha256}
        self.blobs.publish(self.model.round, self.model.bytes)

    # -- the job and its model ------------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """Completed rounds: the collecting round's number, or the next one's between a close and its opening."""
        return self.model.round

    def newest_round(self) -> int:
        """The newest round open: the one ahead with overlapped rounds, the collecting one, or the next one's number
        between a close and its opening."""
        return self.next_round.round if self.next_round is not None else self.model.round

    def model_by_hash(self, model_hash: str) -> GlobalModel | None:
        """The model held, or one a round in flight trains on, by its hash; None for any other."""
        rounds = [r.base for r in (self.open_round, self.next_round) if r is not None]
        return next((m for m in [self.model, *rounds] if m.hash == model_hash), None)

    @property
    def model_hash(self) -> str:
        return self.model.hash

    @property
    def params(self) -> torch.Tensor:
        """The current parameters (flat float32, sharing the model's memory: read them, never write to them)."""
        return self.model.tensor()

    @property
    def max_payload(self) -> int:
        return self.intake.max_payload

    def describe(self, credentials: bool = False) -> dict:
        """The job as nodes and users see it: the fixed model, the governed parameters in force and the ICE
        servers, whose TURN credentials only with `credentials` (a node's Welcome), never in public views."""
        p = self.governor.params
        return {"model": self.job.model, "config": self.cfg.to_dict(), "params": self.n_params,
                "tokenizer": self.job.tokenizer,
                "inner_steps": int(p["inner_steps"]), "batch": int(p["batch"]), "lr": float(p["lr"]),
                "aggregator": p["aggregator"], "codec": compress.format_codec(self.codec),
                "delta_codec": compress.format_codec(self.strategy.delta_codec), "rounds": self.job.rounds,
                "overlap": overlapped(p),
                "deadline_seconds": self.deadline_seconds,
                # what a node needs to train it (a browser checks largest_buffer_bytes against its WebGPU limits)
                "memory": training_memory(self.cfg, int(p["batch"])).to_dict(),
                "ice_servers": [s if credentials else {"urls": s["urls"]} for s in self.ice_servers]}

    def model_signature(self, round_: int, hash_: str) -> str:
        return self.key.sign(signing_bytes("model", {"round": round_, "model_hash": hash_}))

    def round_config(self) -> dict:
        """What nodes run this round (RoundStrategy.round_config with the governance and deadline in force)."""
        return self.strategy.round_config(self.governor.governance, self.deadline_seconds)

    def status(self) -> dict:
        return status(self)

    def bytes_sent(self) -> int:
        """Everything the coordinator has sent since it started: over nodes' links (messages and models) and as
        blobs over HTTP. Signaling's handshake frames (a few hundred bytes a join) are not counted."""
        return self.intake.bytes_sent + self.blobs.bytes_served

    # -- sessions (intake does the work) ----------------------------------------------------------------------

    @property
    def sessions(self) -> dict[str, NodeSession]:
        return self.intake.sessions

    def admit(self, node_id: str, kind: str, address: str = "") -> Refusal | None:
        return self.intake.admit(node_id, kind, address)

    def attach(self, session: NodeSession) -> None:
        self.intake.attach(session)

    def detach(self, session: NodeSession) -> None:
        self.intake.detach(session)

    async def remove(self, session: NodeSession, error: Error) -> None:
        await self.intake.remove(session, error)

    async def node_ready(self, session: NodeSession) -> None:
        await self.intake.node_ready(session)

    async def on_message(self, session: NodeSession, msg: Message) -> None:
        await self.intake.on_message(session, msg)

    async def on_payload(self, session: NodeSession, header: PayloadHeader, data: bytes) -> None:
        await self.intake.on_payload(session, header, data)

    # -- rounds -------------------------------------------------------------------------------------------

    def _round_complete(self, rnd: OpenRound) -> bool:
        reported = rnd.reported
        waiting = [s for s in self.intake.assignable_sessions()  # a paused node is not waited for
                   if s.node_id in rnd.assignments and s.node_id not in reported]
        return bool(rnd.accepted) and (not waiting or time.time() >= rnd.deadline)

    async def run(self) -> None:
        """Open, wait for and close rounds until the job's round count is reached (forever when 0). With overlapped
        rounds the next round is open while this one collects (`next_round`): it collects once this one closed."""
        while not self.finished:
            if self.job.rounds and self.round >= self.job.rounds:
                await self.settled()
                if self.round >= self.job.rounds:  # (a settle that failed took the last round back)
                    await self._finish()
                    return
            while not self.intake.assignable_sessions():
                self.changed.clear()
                await self.changed.wait()
            self.intake.expire_pending()
            rnd = await self._collect()
            await self.intake.replay_deferred(rnd)
            # with overlap the round ahead opens now, on the newest model; but never beside the job's first round:
            # both would train on the initial model, and the first pseudo-gradient, by far the largest of the run,
            # would be taken twice (bench/README.md, "Overlapped rounds")
            ahead = rnd.round + 1
            if overlapped(self.governor.params) and rnd.round > 0 and (not self.job.rounds or ahead < self.job.rounds):
                self.next_round = self._open(ahead, 2 * self.deadline_seconds)
                for s in self.intake.assignable_sessions():
                    await self.intake.assign(s, self.next_round)
            while not rnd.abandoned and not self._round_complete(rnd):
                if time.time() >= rnd.deadline and not rnd.accepted:
                    rnd.deadline = time.time() + self.deadline_seconds  # nothing arrived: keep waiting
                    log.info("round %d: no update by the deadline; extended", rnd.round + 1)
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), max(0.05, rnd.deadline - time.time()))
                except asyncio.TimeoutError:
                    pass
            await self.settled()  # the round before commits first: one settle at a time, in round order
            if rnd.abandoned:  # its model was taken back with the round before it
                await self._abandon_round(rnd, None)
                continue
            try:
                await self._close_round(rnd)
            except Exception as e:  # noqa: BLE001 - a round's failure must never stop the coordinator
                await self._abandon_round(rnd, e)

    def _open(self, number: int, deadline_seconds: float) -> OpenRound:
        """Round `number` on the model held now, with the config in force, its assignments remembered by intake."""
        now = time.time()
        rnd = OpenRound(number, now, now + deadline_seconds, dataclasses.replace(self.model),
                        config=self.round_config(), bytes_sent_before=self.bytes_sent())
        self.intake.opened(rnd)
        rnd.advice = advise([s.node_id for s in self.intake.assignable_sessions()], self.peers, rnd.round)
        return rnd

    async def _collect(self) -> OpenRound:
        """The round that collects updates now: the overlapped round opened while the last one collected, or a new
        one, assigned to every node that takes work."""
        ahead, self.next_round = self.next_round, None
        now = time.time()
        if ahead is not None and not ahead.abandoned:
            rnd = ahead  # its nodes have been training it since the round before it collected
            rnd.opened_at, rnd.deadline = now, now + self.deadline_seconds
        else:
            if ahead is not None:  # opened on a model that was taken back
                await self._tell_abandoned(ahead)
            rnd = self._open(self.round, self.deadline_seconds)
        self.open_round = rnd
        turnaround = ""
        if self._last_update_at is not None:
            self.turnarounds.append(now - self._last_update_at)
            turnaround, self._last_update_at = f", {self.turnarounds[-1]:.2f}s after the last update", None
        # logs count rounds as status does: round N is the one whose commit completes N rounds
        log.info("round %d %s: %d node(s), H=%d, deadline in %.1fs%s", rnd.round + 1,
                 "collects" if rnd is ahead else "open", len(self.intake.assignable_sessions()),
                 rnd.config["inner_steps"], rnd.deadline - now, turnaround)
        for s in self.intake.assignable_sessions():
            if rnd is not ahead or s.node_id not in rnd.assignments:  # (those it was announced to hold it)
                await self.intake.assign(s, rnd)
        return rnd

    async def _close_round(self, rnd: OpenRound) -> None:
        """The critical path: judge, aggregate, take the outer step and publish the new model, which the next
        round then trains on at once. Its scores, validation loss, checkpoint and books settle in the background
        (`_settle`), and the store commits them all in one transaction."""
        rnd.closing = True  # from now on intake defers updates to the next round, so `accepted` holds still
        closed_at = time.time()
        self._last_update_at = max((u.received_at for u in rnd.updates.values()), default=closed_at)
        # copies and spot checks leave before anything is aggregated; all of it off the event loop (seconds at 10M)
        await asyncio.to_thread(self.judge.judge, rnd, rnd.accepted, rnd.base, self.governor)
        accepted = rnd.accepted
        governed = dict(self.governor.params)
        values = [a.values for a in accepted]
        grad, discarded = await asyncio.to_thread(self.strategy.aggregate, rnd.round, values,
                                                  [a.weight for a in accepted], governed)
        # an overlapped round's updates were computed on the model before the one they step (the first round that
        # collects after a start is not stale)
        staleness = self.model.round - rnd.base.round
        params, momentum, payload, residual = await asyncio.to_thread(self._step, grad, governed, staleness)
        for i, a in enumerate(accepted):
            a.aggregated = i not in discarded
        new_round = rnd.round + 1
        # the rules for the next round, weighed with the reputation of the last settled round
        # (a round already open ahead keeps the config it was given: the change reaches the round opened after it)
        first = new_round + 1 if self.next_round is not None else new_round
        for change in self.governor.boundary(new_round):
            log.info("governance: %s %s -> %s takes effect in round %d", change.kind, change.target, change.after,
                     first + 1)
        before = dataclasses.replace(self.model)  # (arrays are never written in place: sharing them is safe)
        settle = Settle(rnd, accepted, governed, before, Checkpoint(new_round, params, momentum), closed_at,
                        self.bytes_sent() - rnd.bytes_sent_before, self.strategy.delta_residual)
        self.model.advance(settle.checkpoint)  # the model is current from here; it is committed when it settles
        try:
            self.blobs.publish(self.model.round, self.model.bytes, (self.model.previous_hash,
                                                                     compress.format_codec(self.strategy.delta_codec),
                                                                     payload))
        except BaseException:
            self.model = before
            raise
        self.strategy.delta_residual = residual
        self.open_round = None
        self.settling = settle
        # a round that refused work settles before the next one opens: its slashes move reputation, and a node the
        # rules now quarantine must not be handed that round (honest rounds, the common case, settle behind it)
        refused = any(u.decision is not None and not u.accepted for u in rnd.updates.values())
        log.info("round %d closed: %d accepted, %s", new_round, len(accepted),
                 "settling before the next round opens" if refused or not self.settle_in_background
                 else "settling in the background")
        if self.settle_in_background and not refused:
            self._settle_task = asyncio.create_task(self._settle(settle), name=f"settle round {new_round}")
        else:
            await self._settle(settle)

    def _step(self, grad: np.ndarray | None, governed: dict, staleness: int):
        """The outer step and its delta as nodes will apply it, in a worker thread: (the parameters every node
        will hold, the momentum, the encoded delta, its residual)."""
        params, momentum = self.strategy.outer_step(self.model, grad, governed, staleness)
        params, payload, residual = self.strategy.delta(self.model, params)  # what every node will hold
        return params, momentum, payload, residual

    @property
    def settling_round(self) -> OpenRound | None:
        """The closed round whose books are settling (its decisions are not in the store yet), if any."""
        return self.settling.round if self.settling is not None else None

    def committed_rounds(self) -> int:
        """Rounds committed to the store: `round`, or one fewer while a round settles."""
        last = self.store.last_round()
        return 0 if last is None else last.round

    async def settled(self) -> None:
        """Wait until no round is settling."""
        task = self._settle_task
        if task is not None:
            await asyncio.shield(task)

    async def _settle(self, s: Settle) -> None:
        """Score the round's updates, measure the validation loss and write the checkpoint (in a worker thread),
        then settle the books and commit the round in one store transaction; then receipts and RoundClosed. A
        failure takes the model back to the last commit (`_take_back`)."""
        new_round = s.checkpoint.round
        try:
            if self.settle_delay:  # fault injection for tests: a wide window in which to kill the process
                await asyncio.sleep(self.settle_delay)
            val_loss, path, sha = await asyncio.to_thread(self._score_and_save, s)
            updates = list(s.round.updates.values())
            trusted = self.job.verify_share == 0  # with checks off, accepted work is trusted
            entries = self.governor.settle(new_round, [o for o in (u.outcome(trusted) for u in updates)
                                                       if o is not None])
            for node_id, why in self.governor.failures:
                self.intake_errors += 1
                log.error("round %d: the books refused an entry for %s and the round commits without it: %s",
                          new_round, node_id[:12], why)
            self._adapt(rnd := s.round)  # the deadline from the next round opened on, and quarantines
            rejected = sum(1 for u in updates if not u.accepted)
            head, model_hash = self.governor.ledger.head, s.checkpoint.model_hash
            record = RoundRecord(new_round, model_hash, path.name, sha, val_loss, len(s.accepted), rejected,
                                 sum(u.update.tokens for u in s.accepted), rnd.bytes_received, rnd.opened_at,
                                 s.closed_at, rnd.deadline, head,
                                 self.key.sign(round_record_bytes(new_round, model_hash, head)), s.bytes_sent)
            books = self.governor.snapshot()
            self.store.commit_round(record, [u.record() for u in updates], books["ledger"],
                                    self.governor.ledger.balances(), books["meta"], books["proposals"])
        except Exception as e:  # noqa: BLE001 - a round's failure must never stop the coordinator
            self.settling = self._settle_task = None
            await self._take_back(s, e)
            return
        self.governor.committed()
        high = self.governor.governance.rules.bounds("storage", "checkpoints_kept").high
        prune_checkpoints(self.data_dir / "checkpoints", None if high is None else int(high))
        log.info("round %d committed: %d accepted, %d rejected, validation loss %.4f", new_round,
                 len(s.accepted), rejected, val_loss)
        for entry in entries:
            session = self.sessions.get(entry.node)
            if session is not None and entry.kind in ("reward", "slash"):
                await self.intake.send(session, Receipt(entry.to_dict(), self.governor.sign_receipt(entry)))
        for session in self.intake.ready_sessions():
            await self.intake.send(session, RoundClosed(new_round, val_loss, len(s.accepted), rejected))
        for node_id, decision in list(self.policy.quarantined.items()):
            session = self.sessions.get(node_id)
            if session is not None:
                await self.remove(session, Error("quarantined", "; ".join(decision.reasons), fatal=True))
        self.settling = self._settle_task = None
        self.changed.set()

    def _score_and_save(self, s: Settle):
        """Each accepted update's quality (on the model it was computed on), the new model's validation loss and
        its checkpoint file: (validation loss, checkpoint path, its sha256)."""
        qualities = self.strategy.qualities(s.round.base, [a.values for a in s.accepted], s.governed)
        for a, quality in zip(s.accepted, qualities):
            a.quality_ppm = quality
        val_loss = self.strategy.evaluate(s.checkpoint.params)
        path, sha = write_checkpoint(self.data_dir / "checkpoints", s.checkpoint)
        return val_loss, path, sha

    async def _take_back(self, s: Settle, error: BaseException) -> None:
        """A round that could not be committed does not count: the model, the delta's residual and the books go
        back to the last commit, the round opened on its model since is abandoned, and the nodes are told."""
        self.intake_errors += 1
        log.error("round %d could not be committed; the model goes back to round %d's", s.checkpoint.round,
                  s.before.round, exc_info=error)
        self.model = s.before
        self.strategy.delta_residual = s.residual_before
        self.blobs.publish(self.model.round, self.model.bytes)
        self.governor = Governor(self.store, self.key, self.job.governed(), None)  # the committed books, reloaded
        in_flight = [r for r in (self.open_round, self.next_round) if r is not None]  # on its model, or after it
        for rnd in in_flight:
            rnd.abandoned = True
            self.changed.set()
        await self.intake.forget([r.round for r in in_flight])
        await self._tell_abandoned(s.round)

    async def _abandon_round(self, rnd: OpenRound, error: BaseException | None) -> None:
        """A round whose close failed, or whose model was taken back, is not committed: the books go back to the
        last commit, the nodes are told, and the next round opens on the model held. The coordinator carries on."""
        self.open_round = None
        if self.next_round is not None:  # numbered after a round that does not commit now: it opens again
            self.next_round.abandoned = True
            await self.intake.forget([self.next_round.round])
        if error is not None:
            self.intake_errors += 1
            if self.model.round > rnd.round:  # it failed after its model was published: it settles or is taken back
                log.error("after closing round %d", self.model.round, exc_info=error)
                return
            log.error("round %d could not be closed and is abandoned; the next round opens on the same model",
                      rnd.round + 1, exc_info=error)
            self.governor = Governor(self.store, self.key, self.job.governed(), None)  # the committed books
        await self._tell_abandoned(rnd)

    async def _tell_abandoned(self, rnd: OpenRound) -> None:
        for a in rnd.accepted:
            session = self.sessions.get(a.node_id)
            if session is not None:
                await self.intake.send(session, Error("round_abandoned", f"round {rnd.round + 1} could not be "
                                                      "committed; its updates do not count"))

    async def shutdown(self) -> None:
        """Let a round that is settling commit (the server is stopping)."""
        try:
            await self.settled()
        except Exception:  # noqa: BLE001 - _settle logs its own failures
            pass

    def _adapt(self, rnd: OpenRound) -> None:
        """The coordinator's autonomy loop: move the deadline with node speeds, quarantine by the rules."""
        weights = self.governor.reputation
        self.policy.observe(CoordinatorObservation(
            rnd.round, {**self.governor.params, "deadline_seconds": self.deadline_seconds}, rnd.reports,
            {node_id: standing(node_id, weights[node_id]) for node_id in self.sessions}))
        self.policy.run_once()
        if self.policy.deadline_seconds is not None and self.policy.deadline_seconds != self.deadline_seconds:
            log.info("deadline moves from %.1fs to %.1fs", self.deadline_seconds, self.policy.deadline_seconds)
            self.deadline_seconds = float(self.policy.deadline_seconds)

    async def _finish(self) -> None:
        await self.settled()
        self.finished = True
        log.info("job finished after %d rounds", self.round)
        await self.intake.refuse_deferred()
        for s in self.intake.ready_sessions():
            await self.intake.send(s, Bye("job finished"))
