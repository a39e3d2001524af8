"""Intake: the coordinator's sessions with nodes, and every update's way in. A signed update is checked on arrival
(identity, replay, protocol, claims beyond its assignment), its bytes are awaited for a bounded time, then decoded
and judged by the update rules, and the verdict is booked in the open round as one record.

It knows nothing of transports: sessions hand it messages and payloads, and it answers through each session's
link. Never let a rejected update touch the aggregate or the model, and never book an update that is not its
sender's own signed statement.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from server.codecs import decode_numpy
from server.coordinator.governor import RecentJoins
from server.coordinator.open_round import Assignments, DecidedUpdate, OpenRound
from server.coordinator.tracker import advise_joiner
from server.keys import SignatureError, verify
from server.log_limits import LogLimiter
from server.net.link import Link, LinkClosed
from shared import compress
from shared.agent import NodeReport
from shared.batches import tokens_allowed
from shared.identity import signing_bytes
from shared.rules import Decision
from shared.wire import (MAX_PEERS, Bye, Error, Message, ModelRequest, NodeState, PayloadHeader, RoundOpen,
                         RoundStats, Update, UpdateResult)

if TYPE_CHECKING:
    from server.coordinator.coordinator import Coordinator

log = logging.getLogger("swarmgrad.coordinator")

# early refusals of work for no assignment in force: answered, never recorded (Intake.refuse)
UNASSIGNED_RULES = ("model_hash", "not_assigned")
STALE_WEIGHT = 0.5  # an update computed on the previous round's model counts once, at this weight
PAYLOAD_SLACK = 1.25  # what a node may send us at most, relative to one fp32 model
# an announced update whose payload has not arrived after this long (plus the time its bytes need at a slow
# link's rate) is dropped, and its memory freed
PAYLOAD_WAIT_S = 30.0
PAYLOAD_WAIT_BYTES_PER_S = 256 * 1024
PENDING_PER_NODE = 2  # announced updates a node may have waiting for their bytes: this round's and a late one
SECONDS_SLACK_S = 2.0  # a node's reported training time may exceed the wall time since its assignment by this
SPEED_JUMP = 8.0  # a node reporting more than this many times its measured speed is read at that bound
ASSIGNMENTS_KEPT = 8  # rounds whose assignments are remembered; older updates are refused as unassigned
UTILISATION_ROUNDS = 5  # a node's utilisation is over its last this many rounds
JOINS_PER_KEY_PER_MINUTE = 30  # reconnects of one key; a key past it waits, without costing anyone else


@dataclass(frozen=True)
class Refusal:
    """Why a hello was not admitted. `code` goes to the node in the Error; `permanent` refusals (the deny list,
    quarantine) will not change by retrying, the others (join rate, a finished job) may."""

    code: str
    reason: str

    @property
    def permanent(self) -> bool:
        return self.code == "denied"

    def __str__(self) -> str:
        return self.reason


@dataclass(eq=False)
class NodeSession:
    """A connected node as the coordinator sees it. The signaling layer sets `link` once a path is up."""

    node_id: str
    kind: str
    agent: str = ""
    link: Link | None = None
    blob_url: str = ""  # where it serves its blobs over HTTP (Hello.blob_url), for its peers; "" when it does not
    name: str = ""  # the display name and team its signed Hello carried; "" for none
    team: str = ""
    state: str = "connecting"  # connecting -> ready -> training -> submitted; left
    mode: str = "active"  # what the node last said (NodeState): "paused" nodes get no work and are not waited for
    connected_at: float = field(default_factory=time.time)
    # closes every link of this node (set by the transport): a removed node must not keep a socket to talk on
    disconnect: Callable[[], Awaitable[None]] | None = None


@dataclass
class PendingUpdate:
    """A signed update that passed the checks on arrival and waits for its bytes."""

    update: Update
    session: NodeSession
    weight: float
    received_at: float

    @property
    def expires_at(self) -> float:
        return self.received_at + PAYLOAD_WAIT_S + self.update.payload_bytes / PAYLOAD_WAIT_BYTES_PER_S


@dataclass
class DeferredPayload:
    """An update whose bytes arrived while a round closed (decided in the next round, as a late one), or before its
    overlapped round collects (decided when it does)."""

    session: NodeSession
    header: PayloadHeader
    data: bytes
    pending: PendingUpdate
    arrived_at: float = field(default_factory=time.time)  # what its record keeps as received_at


def new_nonce() -> str:
    return secrets.token_hex(32)


class Intake:
    """The sessions and the updates on their way in, for one coordinator: it reads the coordinator's model, open
    round, governor and policy, and writes only the open round's records (and the store's node rows)."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.sessions: dict[str, NodeSession] = {}
        self.bytes_sent = 0  # over nodes' links, messages and models
        self.node_speed: dict[str, float] = {}  # node id -> tokens/s of its last accepted update
        self.traffic: dict[str, RoundStats] = {}  # node id -> how its models came, as it last reported
        self.busy: dict[str, deque] = {}  # node id -> (compute, wall) seconds of its last UTILISATION_ROUNDS rounds
        self.pending: dict[tuple[str, int], PendingUpdate] = {}  # (node id, transfer id) -> awaiting its bytes
        self.deferred: list[DeferredPayload] = []  # arrived while a round closed
        # the assignments of recent rounds, without their updates: a late update is checked against its own
        self.assigned: dict[int, Assignments] = {}
        self.forgotten: dict[int, Assignments] = {}  # those of rounds abandoned in flight, until they open again
        self.peer_log = LogLimiter(log)  # lines a node's input can cause: rate-limited, so they cannot flood
        self._reconnects = RecentJoins()  # node id -> its admissions in the last minute
        self._shard_counter = 0

    @property
    def max_payload(self) -> int:
        """The most bytes one payload from a node may take: an fp32 update with room to spare, or the job codec's
        worst case where that is larger (top-k of more than half the values, say)."""
        c = self.coordinator
        return max(int(4 * c.n_params * PAYLOAD_SLACK), compress.max_wire_size(c.codec, c.n_params)) + 1024

    # -- sessions -----------------------------------------------------------------------------------------

    def admit(self, node_id: str, kind: str, address: str = "") -> Refusal | None:
        """The admission hook: None to admit, or why not. Joins are limited per address (new keys) and per key
        (reconnects), never globally, so that one peer cannot lock the others out."""
        c = self.coordinator
        if c.finished:
            return Refusal("finished", "the job is finished")
        if node_id in c.policy.quarantined:
            return Refusal("denied", "quarantined: " + "; ".join(c.policy.quarantined[node_id].reasons))
        recent = self._reconnects.count(node_id)
        if recent >= JOINS_PER_KEY_PER_MINUTE:
            return Refusal("busy", f"this key connected {recent} times in the last minute; retry later")
        decision = c.governor.admit(node_id, c.model.round, address=address,
                                    returning=c.store.is_known_node(node_id))  # a known key coming back is no join
        if not decision.allowed:
            code = "busy" if decision.blocked_by == ["joins-per-minute"] else "denied"
            return Refusal(code, f"blocked by {', '.join(decision.blocked_by)}: {'; '.join(decision.reasons)}")
        self._reconnects.add(node_id)
        return None

    def attach(self, session: NodeSession) -> None:
        old = self.sessions.get(session.node_id)
        if old is not None and old is not session:
            old.state = "left"  # a reconnect replaces the old session; its link is dead or about to be
        self.sessions[session.node_id] = session
        self.coordinator.store.touch_node(session.node_id, session.kind, session.agent, session.name, session.team)

    def detach(self, session: NodeSession) -> None:
        session.state = "left"  # whatever it sends from now on is dropped (see heard)
        for key in [k for k, p in self.pending.items() if p.session is session]:
            del self.pending[key]  # bytes that can no longer arrive
        # updates of a round not yet collecting: dropped, so that the node's resend after a reconnect is heard
        self.deferred = [d for d in self.deferred if d.session is not session]
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.coordinator.changed.set()

    async def remove(self, session: NodeSession, error: Error) -> None:
        """Tell a node why it is removed, detach it and close its links: nothing it sends is heard again."""
        await self.send(session, error)
        self.detach(session)
        if session.disconnect is not None:
            try:
                await session.disconnect()
            except Exception as e:  # the transport may be half gone already; the session is detached anyway
                log.info("closing the links of %s: %s", session.node_id[:12], e)

    def utilisation(self, node_id: str) -> float | None:
        """The share of a node's recent rounds' wall time it spent training, as it reports them; None before any."""
        busy = self.busy.get(node_id)
        if not busy:
            return None
        return min(1.0, sum(c for c, _ in busy) / sum(w for _, w in busy))

    def heard(self, session: NodeSession) -> bool:
        """Whether to hear this session at all: a detached, replaced or quarantined node is not heard."""
        return session.state != "left" and session.node_id not in self.coordinator.policy.quarantined

    def ready_sessions(self) -> list[NodeSession]:
        return [s for s in self.sessions.values() if s.link is not None and s.state != "left"]

    def assignable_sessions(self) -> list[NodeSession]:
        """The ready sessions a round gives work to and waits for: not those paused by their users."""
        return [s for s in self.ready_sessions() if s.mode != "paused"]

    async def node_ready(self, session: NodeSession) -> None:
        """The session's link is up: give it work if a round is open."""
        c = self.coordinator
        session.state = "ready"
        if session.link is not None:
            c.store.set_node_path(session.node_id, session.link.path)
        if c.finished:
            await self.send(session, Bye("job finished"))
            return
        for rnd in (c.open_round, c.next_round):
            if rnd is not None:
                await self.assign(session, rnd)
        c.changed.set()

    async def send(self, session: NodeSession, msg: Message) -> bool:
        if session.link is None:
            return False
        link, before = session.link, session.link.bytes_sent
        try:
            await link.send_message(msg)
            return True
        except LinkClosed:
            self.detach(session)
            return False
        finally:
            self.bytes_sent += link.bytes_sent - before

    # -- assignments ----------------------------------------------------------------------------------------

    def opened(self, rnd: OpenRound) -> None:
        """Remember what `rnd` assigns (for ASSIGNMENTS_KEPT rounds), so that its late updates can be checked. A
        round abandoned in flight and opened again on the same model keeps its shards and assignment times: the
        work its nodes did or still do for it is that round's work, and reproduces as such."""
        old = self.forgotten.pop(rnd.round, None)
        if old is not None and old.model_hash == rnd.base.hash:
            for node_id, shard in old.assignments.items():
                rnd.assignments.setdefault(node_id, shard)
            for node_id, at in old.assigned_at.items():
                rnd.assigned_at.setdefault(node_id, at)
        self.assigned[rnd.round] = rnd.assigned()
        for old in [r for r in self.assigned if r <= rnd.round - ASSIGNMENTS_KEPT]:
            del self.assigned[old]

    async def assign(self, session: NodeSession, rnd: OpenRound) -> None:
        if rnd.decided(session.node_id, rnd.round):
            return
        c = self.coordinator
        shard = rnd.assignments.get(session.node_id)
        if shard is None:
            shard = self._shard_counter % c.corpus.num_shards
            self._shard_counter += 1
            rnd.assignments[session.node_id] = shard
        rnd.assigned_at.setdefault(session.node_id, time.time())
        advice = rnd.advice.get(session.node_id)
        if advice is None:  # joined while the round was open: its place in the ring among those here now
            ids = [s.node_id for s in self.ready_sessions()] + [session.node_id]
            # the chunks stay split as the round opened, or finer when fewer nodes were there to seed them then
            slots = max(next(iter(rnd.advice.values())).seed_slots if rnd.advice else 1, len(set(ids)))
            advice = advise_joiner(ids, session.node_id, c.peers, slots, rnd.round)
        model = rnd.base.hash
        msg = RoundOpen(rnd.round, model, c.model_signature(rnd.round, model), rnd.config, shard,
                        rnd.deadline, c.blobs.manifest_of(model), c.blobs.delta_of(model),
                        list(advice.peers), advice.seed_slot, advice.seed_slots,
                        self._peer_urls(session.node_id, advice.peers, rnd))
        if await self.send(session, msg):
            session.state = "training"

    def _peer_urls(self, node_id: str, dials: tuple[str, ...], rnd: OpenRound) -> dict[str, str]:
        """The blob URLs of the peers `node_id` links to this round, either way (it dials `dials`; the others dial it),
        for those connected that serve blobs over HTTP."""
        linked = dict.fromkeys([*dials, *(n for n, a in rnd.advice.items() if node_id in a.peers)])
        urls = {}
        for peer in linked:
            session = self.sessions.get(peer)
            if session is not None and session.blob_url and peer != node_id:
                urls[peer] = session.blob_url
        return dict(list(urls.items())[:MAX_PEERS])

    # -- messages from nodes ------------------------------------------------------------------------------

    async def on_message(self, session: NodeSession, msg: Message) -> None:
        if not self.heard(session):
            return
        if isinstance(msg, ModelRequest):
            await self._send_model(session, msg)
        elif isinstance(msg, Update):
            await self._on_update(session, msg)
        elif isinstance(msg, RoundStats):
            self.traffic[session.node_id] = msg  # self-reported, for the status view only
            if msg.wall_seconds > 0:
                busy = self.busy.setdefault(session.node_id, deque(maxlen=UTILISATION_ROUNDS))
                busy.append((msg.compute_seconds, msg.wall_seconds))
        elif isinstance(msg, NodeState):
            await self._on_node_state(session, msg.state)
        elif isinstance(msg, Bye):
            if self.sessions.get(session.node_id) is session:
                self.coordinator.governor.leave(session.node_id)  # a clean leave: the stake returns at the close
            self.detach(session)
        else:
            self.peer_log.warning("ignoring %s from %s", msg.TYPE, session.node_id[:12])

    async def _on_node_state(self, session: NodeSession, mode: str) -> None:
        """A node paused, resumed or is finishing. Pausing costs nothing: the round stops waiting for it. A node back
        from a pause that holds no assignment of the open round gets one; one that holds it carries on with it."""
        was, session.mode = session.mode, mode
        c = self.coordinator
        for rnd in (c.open_round, c.next_round):
            if (was == "paused" and mode != "paused" and rnd is not None and not rnd.closing
                    and session.node_id not in rnd.assignments):
                await self.assign(session, rnd)
        c.changed.set()

    async def _send_model(self, session: NodeSession, req: ModelRequest) -> None:
        model = self.coordinator.model_by_hash(req.model_hash)
        if model is None:
            await self.send(session, UpdateResult(req.round, False, "the requested model is not current", "stale"))
            return
        if session.link is None:
            return
        link, before = session.link, session.link.bytes_sent
        try:
            await link.send_payload("model", model.bytes, {"round": model.round, "model_hash": model.hash})
        except LinkClosed:
            self.detach(session)
        finally:
            self.bytes_sent += link.bytes_sent - before

    def _unsigned(self, session: NodeSession, u: Update) -> tuple[str, str] | None:
        """(rule, reason) when the update is not this node's own signed statement. Such an update is answered and
        never booked: booking it would let anyone write into another node's record."""
        if u.node_id != session.node_id:
            return "identity", "update signed for another node id"
        try:
            verify(u.node_id, signing_bytes("update", u.signing_fields()), u.signature)
        except SignatureError as e:
            return "signature", str(e)
        return None

    def _decided(self, node_id: str, update_round: int) -> bool:
        """Whether an update of this node for this round was already heard: one decision per (node, round), ever,
        across restarts too (committed decisions are in the store)."""
        key = (node_id, update_round)
        rnd = self.coordinator.open_round
        if rnd is not None and rnd.decided(node_id, update_round):
            return True
        ahead = self.coordinator.next_round
        if ahead is not None and key in ahead.updates:
            return True
        settling = self.coordinator.settling_round  # closed, its decisions not in the store yet
        if settling is not None and key in settling.updates:
            return True
        if any((p.update.node_id, p.update.round) == key for p in self.pending.values()):
            return True
        if any((d.pending.update.node_id, d.pending.update.round) == key for d in self.deferred):
            return True
        return self.coordinator.store.update_decided(node_id, update_round)

    def _claims_rejection(self, session: NodeSession, u: Update) -> tuple[str, str] | None:
        """(rule, reason) when what the update claims could not have been done for its assignment: more steps or
        tokens than it was given, or more training time than has passed since it was sent."""
        rnd = self.assigned.get(u.round)
        if rnd is None or session.node_id not in rnd.assignments:
            return "not_assigned", f"this node was given no assignment for round {u.round + 1}"
        seq = int(rnd.config["seq_len"])
        steps, batch = int(rnd.config["inner_steps"]), int(rnd.config["batch"])
        allowed = tokens_allowed(steps, batch, seq)
        if not 1 <= u.inner_steps <= steps:
            return "claims", f"{u.inner_steps} inner steps claimed; the assignment allows 1 to {steps}"
        if u.tokens > u.inner_steps * batch * seq or u.tokens % (u.inner_steps * seq):
            return "claims", (f"{u.tokens} tokens claimed for {u.inner_steps} steps of {seq} tokens; the assignment "
                              f"allows whole batches of at most {batch} sequences ({allowed} tokens in all)")
        elapsed = time.time() - rnd.assigned_at.get(session.node_id, rnd.opened_at)
        if not 0.0 <= u.seconds <= elapsed + SECONDS_SLACK_S:
            return "claims", f"{u.seconds:.1f}s of training claimed, {elapsed:.1f}s after the assignment was sent"
        return None

    def _early_rejection(self, session: NodeSession, u: Update) -> tuple[str, str] | None:
        """(rule, reason) when the signed update breaks the protocol itself (encoding, unknown model, claims beyond
        its assignment); checked before its bytes arrive. What the rules decide is checked on the bytes."""
        c = self.coordinator
        if c.finished:
            return "no_round", "the job has finished"
        # an update that arrives while its round is not collecting (the round before closes, or still collects)
        # waits for it (on_payload)
        assigned = self.assigned.get(u.round)
        if assigned is not None and u.model_hash != assigned.model_hash:
            return "model_hash", f"update for round {u.round} names another model than that round's"
        if u.round > c.newest_round():
            return "model_hash", f"round {u.round} has not opened"
        if u.num_values != c.n_params:
            return "shape", f"update has {u.num_values} values, the model has {c.n_params}"
        try:
            spec = compress.CodecSpec.from_dict(u.codec)
            compress.encoded_size(spec, u.num_values)
        except compress.CodecError as e:
            return "codec", str(e)
        try:
            compress.check_wire_size(spec, u.num_values, u.payload_bytes)
        except compress.CodecError as e:
            return "shape", str(e)
        return self._claims_rejection(session, u)

    async def _on_update(self, session: NodeSession, u: Update) -> None:
        unsigned = self._unsigned(session, u)
        if unsigned is not None:
            await self.send(session, UpdateResult(u.round, False, unsigned[1], unsigned[0]))
            return
        if self._decided(u.node_id, u.round):  # a replay, or a second update for the same round: never booked
            await self.send(session, UpdateResult(u.round, False, f"an update of this node for round {u.round + 1} "
                                                                  "was already received", "replay"))
            return
        rejection = self._early_rejection(session, u)
        if rejection is not None and rejection[0] in UNASSIGNED_RULES:
            await self.refuse(session, u, *rejection)
            return
        if rejection is not None:
            await self.reject(session, u, *rejection)
            return
        self.expire_pending()
        if sum(p.session is session for p in self.pending.values()) >= PENDING_PER_NODE:
            await self.send(session, UpdateResult(u.round, False, f"{PENDING_PER_NODE} announced updates are still "
                                                                  "waiting for their bytes", "pending"))
            return
        weight = 1.0 if u.round >= self.coordinator.round else STALE_WEIGHT  # (the round collecting, or ahead)
        self.pending[(session.node_id, u.transfer_id)] = PendingUpdate(u, session, weight, time.time())

    def expire_pending(self) -> None:
        """Drop announced updates whose bytes did not arrive in time, and free what they held."""
        now = time.time()
        for key, pending in list(self.pending.items()):
            if now > pending.expires_at:
                del self.pending[key]
                log.info("dropped the update of %s for round %d: its payload did not arrive in time",
                         key[0][:12], pending.update.round + 1)

    async def on_payload(self, session: NodeSession, header: PayloadHeader, data: bytes,
                         arrived_at: float | None = None) -> None:
        """An update's bytes (`arrived_at`: when they came, for one that waited in `deferred`)."""
        if not self.heard(session):
            return
        pending = self.pending.pop((session.node_id, header.transfer_id), None)
        if pending is None:
            return  # its Update was rejected before the bytes arrived (and the node was told)
        u = pending.update
        if header.sha256 != u.payload_sha256 or header.kind != "update":
            await self.reject(session, u, "integrity", "payload does not match the signed update")
            return
        c = self.coordinator
        rnd = c.open_round
        if (rnd is None or rnd.closing or u.round > rnd.round) and not c.finished:
            # the round is being aggregated (or the next not yet open): the update waits for the next round,
            # where it counts as a late one; taken now, it would be told "accepted" and never aggregated. An
            # update of an overlapped round that does not collect yet waits for it likewise, and counts in full
            self.deferred.append(DeferredPayload(session, header, data, pending, arrived_at or time.time()))
            return
        if rnd is None:
            await self.reject(session, u, "no_round", "the job has finished")
            return
        try:
            values = decode_numpy(compress.CodecSpec.from_dict(u.codec), data, u.num_values)
        except compress.CodecError as e:
            await self.reject(session, u, "codec", str(e))
            return
        with np.errstate(over="ignore", invalid="ignore"):
            norm = float(np.linalg.norm(values.astype(np.float64)))
        decision = c.governor.check_update(rnd.round, u.node_id, {
            "pseudo_gradient_norm": norm, "loss": u.loss_last, "numel": int(values.size),
            "expected_numel": c.n_params, "updates_this_round": int(rnd.decided(session.node_id, u.round)),
            "staleness": rnd.round - u.round, "tokens": u.tokens})
        if not decision.allowed:
            await self.reject(session, u, ",".join(decision.blocked_by), "; ".join(decision.reasons), decision)
            return
        received = arrived_at or time.time()
        rnd.add(DecidedUpdate(u, pending.weight, "", len(data), values, decision,
                              self._report(rnd, u, received), received_at=received))
        rnd.bytes_received += len(data)
        session.state = "submitted"
        await self.send(session, UpdateResult(u.round, True))
        log.info("round %d: accepted update from %s (%s, H=%d, %d tokens, loss %.3f -> %.3f, norm %.3g, %d bytes)",
                 rnd.round + 1, session.node_id[:12], session.kind, u.inner_steps, u.tokens, u.loss_first, u.loss_last,
                 norm, len(data))
        c.changed.set()

    def _report(self, rnd: OpenRound, u: Update, received: float) -> NodeReport:
        """What an accepted update says about its node's speed, for the deadline policy; a claimed leap in speed
        is read at SPEED_JUMP times the node's last measured speed."""
        seconds = u.seconds
        known_speed = self.node_speed.get(u.node_id)
        if known_speed and seconds > 0 and u.tokens / seconds > SPEED_JUMP * known_speed:
            seconds = u.tokens / (SPEED_JUMP * known_speed)
        if seconds > 0:
            self.node_speed[u.node_id] = u.tokens / seconds
        batch = u.tokens // (u.inner_steps * int(rnd.config["seq_len"]))
        return NodeReport(u.node_id, u.inner_steps, batch, seconds, max(0.0, received - rnd.opened_at - seconds),
                          received <= rnd.deadline)

    async def refuse(self, session: NodeSession, u: Update, rule: str, reason: str) -> None:
        """Refuse an update for no assignment in force, and record nothing: such work is no decision about the
        node's round (it may be for a round abandoned and opened again, whose new assignment the node then
        trains), so it must not stand in the way of the node's update for that round."""
        self.peer_log.warning("round %d: refused update from %s: [%s] %s", u.round + 1, session.node_id[:12], rule,
                              reason)
        await self.send(session, UpdateResult(u.round, False, reason, rule))

    async def forget(self, rounds: list[int]) -> None:
        """Rounds abandoned before they closed: their assignments are forgotten (an update for one is refused until
        it opens again), and the updates for them that wait in `deferred` are refused now."""
        for r in rounds:
            if r in self.assigned:
                self.forgotten[r] = self.assigned.pop(r)
        waiting = [d for d in self.deferred if d.pending.update.round in rounds]
        self.deferred = [d for d in self.deferred if d.pending.update.round not in rounds]
        for d in waiting:
            await self.refuse(d.session, d.pending.update, "round_abandoned", f"round {d.pending.update.round + 1} "
                              "was abandoned; it opens again on the model held")

    async def reject(self, session: NodeSession, u: Update, rule: str, reason: str,
                     decision: Decision | None = None) -> None:
        """Refuse an update: the node is told why, and the open round records it once (booked by the rules'
        `decision` where the update rules refused it; a protocol refusal has none)."""
        self.peer_log.warning("round %d: rejected update from %s: [%s] %s", u.round + 1, session.node_id[:12], rule,
                              reason)
        c = self.coordinator
        ahead = c.next_round is not None and u.round == c.next_round.round
        rnd = c.next_round if ahead else c.open_round  # a refused update of the round ahead is booked there
        if rnd is not None and not rnd.decided(session.node_id, u.round):
            rnd.add(DecidedUpdate(u, 0.0, f"{rule}: {reason}", u.payload_bytes, decision=decision))
        await self.send(session, UpdateResult(u.round, False, reason, rule))
        self.coordinator.changed.set()

    # -- between rounds -----------------------------------------------------------------------------------

    async def replay_deferred(self, rnd: OpenRound) -> None:
        """Decide the updates that arrived while the last round closed, and those of an overlapped round that
        collects now, in the round now open (an update for a round still ahead waits on)."""
        deferred, self.deferred = self.deferred, []
        for d in deferred:
            if d.session.state == "left":
                continue
            u, assigned = d.pending.update, self.assigned.get(d.pending.update.round)
            if assigned is None or u.model_hash != assigned.model_hash:  # (checked on arrival, against then)
                await self.refuse(d.session, u, "model_hash", f"round {u.round + 1} was abandoned and opened again on "
                                                              "another model while the update waited")
                continue
            weight = 1.0 if d.pending.update.round == rnd.round else STALE_WEIGHT
            self.pending[(d.session.node_id, d.header.transfer_id)] = replace(d.pending, weight=weight)
            await self.on_payload(d.session, d.header, d.data, d.arrived_at)

    async def refuse_deferred(self) -> None:
        """The job finished: the updates that waited for a next round are refused."""
        deferred, self.deferred = self.deferred, []
        for d in deferred:
            await self.reject(d.session, d.pending.update, "no_round", "the job finished before the update could count")
