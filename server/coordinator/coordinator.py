"""The coordinator's round logic: assignments, update validation, aggregation, the outer step and commits.

It knows nothing of transports: sessions hand it messages and payloads, and it answers through each session's
link. Never let a rejected update touch the pending aggregate, the model or the store (except as a record).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from server import aggregation
from server.coordinator import copies, spot_check
from server.coordinator.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from server.corpus import Corpus
from server.codecs import decode_numpy
from server.coordinator.governor import Governor, RecentJoins, UpdateOutcome
from server.keys import NodeKey, SignatureError, verify
from server.net.link import Link, LinkClosed
from server.log_limits import LogLimiter
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from server.coordinator.store import RoundRecord, Store, UpdateRecord
from server.training import evaluate, validation_batches
from shared import compress
from shared.agent import CoordinatorObservation, CoordinatorPolicy, NodeReport, standing
from shared.aggregate import AggregationError
from shared.batches import tokens_allowed
from shared.rules import Decision, Verdict
from shared.rewards import quality_to_ppm, round_record_bytes
from shared.diloco import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM
from shared.identity import signing_bytes
from shared.model import model_config, num_parameters
from shared.wire import (Bye, Error, Message, ModelRequest, PayloadHeader, Receipt, RoundClosed, RoundOpen, Update,
                         UpdateResult)

log = logging.getLogger("swarmgrad.coordinator")

STALE_WEIGHT = 0.5  # an update computed on the previous round's model counts once, at this weight
PAYLOAD_SLACK = 1.25  # what a node may send us at most, relative to one fp32 model
CHECKPOINTS_KEPT = 5  # when no storage rule bounds it
DEADLINE_MARGIN = 2.0  # the deadline is this many times the 90th percentile of the nodes' round times
# an announced update whose payload has not arrived after this long (plus the time its bytes need at a slow
# link's rate) is dropped, and its memory freed
PAYLOAD_WAIT_S = 30.0
PAYLOAD_WAIT_BYTES_PER_S = 256 * 1024
PENDING_PER_NODE = 2  # announced updates a node may have waiting for their bytes: this round's and a late one
SECONDS_SLACK_S = 2.0  # a node's reported training time may exceed the wall time since its assignment by this
SPEED_JUMP = 8.0  # a node reporting more than this many times its measured speed is read at that bound
ASSIGNMENTS_KEPT = 8  # rounds whose assignments are remembered; older updates are refused as unassigned
MAX_SPOT_CHECKS = 4  # re-executions a round at most: each costs the coordinator one node's training time
JOINS_PER_KEY_PER_MINUTE = 30  # reconnects of one key; a key past it waits, without costing anyone else


class JobMismatch(Exception):
    """The data directory holds a different job than the one asked for on the command line."""


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


@dataclass(frozen=True)
class JobConfig:
    """One training job as the command line starts it. The model, seed and codec are fixed for the job's life;
    the governed parameters (inner steps, learning rate, batch, aggregator, deadline, outer step) seed the job's
    governance on first start, and from then on only votes change them."""

    model: str = "tiny"
    inner_steps: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    round_deadline: float = 60.0  # seconds from a round's opening to its deadline
    rounds: int = 0  # 0 = forever
    outer_lr: float = DEFAULT_OUTER_LR
    outer_momentum: float = DEFAULT_OUTER_MOMENTUM
    aggregator: str = "mean"
    byzantine_fraction: float = 0.25  # the share of updates a robust aggregator is told to tolerate (its f)
    codec: str = "fp32"
    seed: int = 0
    verify_share: float = 0.05  # the share of updates the coordinator re-executes (spot checks); not governed

    def __post_init__(self) -> None:
        model_config(self.model)  # KeyError naming the known sizes
        if self.inner_steps < 1 or self.batch_size < 1 or self.round_deadline <= 0 or self.rounds < 0:
            raise ValueError("inner_steps and batch_size must be >= 1, round_deadline > 0, rounds >= 0")
        if not 0.0 <= self.verify_share <= 1.0:
            raise ValueError(f"verify_share must lie in [0, 1], got {self.verify_share}")
        if self.aggregator not in aggregation.RULES:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: {', '.join(aggregation.RULES)}")
        try:
            compress.parse_codec(self.codec)
        except compress.CodecError as e:
            raise ValueError(f"bad codec {self.codec!r}: {e}") from None

    def governed(self) -> dict:
        """The governed parameters, under the names governance uses."""
        return {"inner_steps": self.inner_steps, "lr": self.lr, "batch": self.batch_size,
                "aggregator": self.aggregator, "deadline_seconds": self.round_deadline, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum}


@dataclass(eq=False)
class NodeSession:
    """A connected node as the coordinator sees it. The signaling layer sets `link` once a path is up."""

    node_id: str
    kind: str
    agent: str = ""
    link: Link | None = None
    state: str = "connecting"  # connecting -> ready -> training -> submitted; left
    connected_at: float = field(default_factory=time.time)
    # closes every link of this node (set by the transport): a removed node must not keep a socket to talk on
    disconnect: Callable[[], Awaitable[None]] | None = None


@dataclass
class PendingUpdate:
    update: Update
    session: NodeSession
    weight: float
    received_at: float

    @property
    def expires_at(self) -> float:
        return self.received_at + PAYLOAD_WAIT_S + self.update.payload_bytes / PAYLOAD_WAIT_BYTES_PER_S


@dataclass(frozen=True)
class Assignments:
    """What a round gave out: its config, and each node's shard and when its assignment was sent."""

    opened_at: float
    config: dict
    assignments: dict[str, int]  # shared with the OpenRound while it is open
    assigned_at: dict[str, float]


@dataclass(eq=False)  # one update is itself, never equal to another by value
class AcceptedUpdate:
    """An update that passed the rules on arrival; the round's close may still find it a copy or a fake."""

    values: np.ndarray
    weight: float
    record: UpdateRecord
    update: Update
    verdict: object = None  # the Decision booked for it; replaced at close if it is judged a copy or a fake
    verified: bool = False  # re-executed by the spot check and found honest


@dataclass
class OpenRound:
    round: int
    opened_at: float
    deadline: float
    assignments: dict[str, int] = field(default_factory=dict)  # node id -> shard
    assigned_at: dict[str, float] = field(default_factory=dict)  # node id -> when its assignment was sent
    reported: set[str] = field(default_factory=set)  # node ids whose update for this round was decided
    late: set[str] = field(default_factory=set)  # node ids whose late update (for the round before) was decided
    config: dict = field(default_factory=dict)  # the round config sent to nodes
    accepted: list[AcceptedUpdate] = field(default_factory=list)
    records: list[UpdateRecord] = field(default_factory=list)
    outcomes: dict[tuple[str, int], tuple] = field(default_factory=dict)  # (node id, update's round) -> (Decision,
    # tokens) for the books: a late update and the node's update for this round are two pieces of work
    reports: list[NodeReport] = field(default_factory=list)
    evidence: dict[tuple[str, int], dict] = field(default_factory=dict)  # (node id, round) -> why it was overruled
    bytes_received: int = 0
    closing: bool = False  # aggregating and committing: updates that arrive now count in the next round

    def decided(self, update_round: int) -> set[str]:
        """The node ids whose update for `update_round` was decided in this round: this round's own, or late."""
        return self.reported if update_round == self.round else self.late


class Coordinator:
    def __init__(self, data_dir: Path, job: JobConfig, corpus: Corpus, store: Store | None = None,
                 rules_toml: str | None = None):
        self.data_dir = data_dir
        self.store = store or Store(data_dir / "state.db")
        self.key = NodeKey.load_or_create(data_dir / "coordinator.key")
        self.corpus = corpus
        self.job = self._load_job(job)
        self.cfg = model_config(self.job.model)
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
        self.sessions: dict[str, NodeSession] = {}
        self.node_speed: dict[str, float] = {}  # node id -> tokens/s of its last accepted update
        self.finished = False
        self._changed = asyncio.Event()
        self._open: OpenRound | None = None
        # the assignments of recent rounds, without their updates: a late update is checked against its own
        self._assigned: dict[int, Assignments] = {}
        self._pending_payloads: dict[tuple[str, int], PendingUpdate] = {}
        self._reconnects = RecentJoins()  # node id -> its admissions in the last minute
        self._spot_check_salt = secrets.token_bytes(32)  # which updates get re-executed: unpredictable to nodes
        self.intake_errors = 0  # settle and commit failures survived (each logged once, with its cause)
        self.peer_log = LogLimiter(log)  # lines a node's input can cause: rate-limited, so they cannot flood
        self._deferred: list[tuple[NodeSession, PayloadHeader, bytes, PendingUpdate]] = []  # arrived while closing
        self._model = GPT(self.cfg)
        self._val_batches = validation_batches(corpus.validation, self.cfg.block_size)
        # quality of an update: the loss change it alone makes on a held-out batch not used for validation
        self._quality_batch = validation_batches(corpus.validation, self.cfg.block_size, num_batches=1, seed=99)
        self._shard_counter = 0
        self._resume()

    # -- state --------------------------------------------------------------------------------------------

    def _load_job(self, job: JobConfig) -> JobConfig:
        stored = self.store.get_meta("job")
        if stored is None:
            self.store.set_meta("job", asdict(job))
            self.store.set_meta("corpus", {"name": self.corpus.name, "sha256": self.corpus.digest})
            return job
        stored_job = JobConfig(**stored)
        if stored_job.model != job.model:
            raise JobMismatch(f"{self.data_dir} holds a job for model {stored_job.model!r}, not {job.model!r}; "
                              "use another --data-dir to start a new job")
        corpus = self.store.get_meta("corpus") or {}
        if corpus.get("sha256") != self.corpus.digest:
            log.warning("the corpus differs from the one this job started with (%s)", corpus.get("name"))
        # the round count and the spot-check share may change across restarts; governed parameters only by vote
        merged = JobConfig(**{**stored, "rounds": job.rounds, "verify_share": job.verify_share})
        self.store.set_meta("job", asdict(merged))
        return merged

    def _resume(self) -> None:
        last = self.store.last_round()
        if last is None:
            init_parameters(self._model, self.job.seed)
            params = flat_parameters(self._model).numpy()
            val = evaluate(self._model, self._val_batches)
            ckpt = Checkpoint(0, params, None)
            path, sha = write_checkpoint(self.data_dir / "checkpoints", ckpt)
            now = time.time()
            signature = self.key.sign(round_record_bytes(0, ckpt.model_hash, ""))
            self.store.commit_round(RoundRecord(0, ckpt.model_hash, path.name, sha, val, 0, 0, 0, 0, now, now, now, "",
                                                signature), [])
            last = self.store.last_round()
            log.info("initialised %s (%d parameters), validation loss %.4f", self.job.model, self.n_params, val)
        ckpt = read_checkpoint(self.data_dir / "checkpoints" / last.checkpoint, last.checkpoint_sha256)
        if ckpt.model_hash != last.model_hash or ckpt.round != last.round:
            raise RuntimeError(f"checkpoint {last.checkpoint} does not match committed round {last.round}")
        self.round = last.round  # completed rounds
        self.params = torch.from_numpy(ckpt.params.copy())
        self.momentum = None if ckpt.momentum is None else torch.from_numpy(ckpt.momentum.copy())
        self.model_hash = last.model_hash
        self.previous_hash = None
        if last.round > 0:
            rounds = self.store.rounds()
            self.previous_hash = rounds[-2].model_hash if len(rounds) > 1 else None
        self._params_bytes = np.ascontiguousarray(ckpt.params, "<f4").tobytes()
        if last.round:
            log.info("resumed at round %d (validation loss %s)", last.round, last.val_loss)

    def describe(self) -> dict:
        """The job as nodes and users see it: the fixed model and the governed parameters in force."""
        p = self.governor.params
        return {"model": self.job.model, "config": self.cfg.to_dict(), "params": self.n_params,
                "inner_steps": int(p["inner_steps"]), "batch_size": int(p["batch"]), "lr": float(p["lr"]),
                "aggregator": p["aggregator"], "codec": compress.format_codec(self.codec), "rounds": self.job.rounds,
                "deadline_seconds": self.deadline_seconds}

    def model_signature(self, round_: int, hash_: str) -> str:
        return self.key.sign(signing_bytes("model", {"round": round_, "model_hash": hash_}))

    # -- sessions -----------------------------------------------------------------------------------------

    def admit(self, node_id: str, kind: str, address: str = "") -> Refusal | None:
        """The admission hook: None to admit, or why not. Joins are limited per address (new keys) and per key
        (reconnects), never globally, so that one peer cannot lock the others out."""
        if self.finished:
            return Refusal("finished", "the job is finished")
        if node_id in self.policy.quarantined:
            return Refusal("denied", "quarantined: " + "; ".join(self.policy.quarantined[node_id].reasons))
        recent = self._reconnects.count(node_id)
        if recent >= JOINS_PER_KEY_PER_MINUTE:
            return Refusal("busy", f"this key connected {recent} times in the last minute; retry later")
        decision = self.governor.admit(node_id, self.round, address=address,
                                       returning=self.store.is_known_node(node_id))  # a known key coming back is no join
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
        self.store.touch_node(session.node_id, session.kind, session.agent)

    def detach(self, session: NodeSession) -> None:
        session.state = "left"  # whatever it sends from now on is dropped (see _intake_open)
        for key in [k for k, p in self._pending_payloads.items() if p.session is session]:
            del self._pending_payloads[key]  # bytes that can no longer arrive
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self._changed.set()

    async def remove(self, session: NodeSession, error: Error) -> None:
        """Tell a node why it is removed, detach it and close its links: nothing it sends is heard again."""
        await self._send(session, error)
        self.detach(session)
        if session.disconnect is not None:
            try:
                await session.disconnect()
            except Exception as e:  # the transport may be half gone already; the session is detached anyway
                log.info("closing the links of %s: %s", session.node_id[:12], e)

    def _intake_open(self, session: NodeSession) -> bool:
        """Whether to hear this session at all: a detached, replaced or quarantined node is not heard."""
        return session.state != "left" and session.node_id not in self.policy.quarantined

    async def node_ready(self, session: NodeSession) -> None:
        """The session's link is up: give it work if a round is open."""
        session.state = "ready"
        if session.link is not None:
            self.store.set_node_path(session.node_id, session.link.path)
        if self.finished:
            await self._send(session, Bye("job finished"))
            return
        if self._open is not None:
            await self._assign(session, self._open)
        self._changed.set()

    async def _send(self, session: NodeSession, msg: Message) -> bool:
        if session.link is None:
            return False
        try:
            await session.link.send_message(msg)
            return True
        except LinkClosed:
            self.detach(session)
            return False

    async def _assign(self, session: NodeSession, rnd: OpenRound) -> None:
        if session.node_id in rnd.reported:
            return
        shard = rnd.assignments.get(session.node_id)
        if shard is None:
            shard = self._shard_counter % self.corpus.num_shards
            self._shard_counter += 1
            rnd.assignments[session.node_id] = shard
        rnd.assigned_at.setdefault(session.node_id, time.time())
        msg = RoundOpen(rnd.round, self.model_hash, self.model_signature(rnd.round, self.model_hash), rnd.config,
                        shard, rnd.deadline)
        if await self._send(session, msg):
            session.state = "training"

    # -- messages from nodes ------------------------------------------------------------------------------

    async def on_message(self, session: NodeSession, msg: Message) -> None:
        if not self._intake_open(session):
            return
        if isinstance(msg, ModelRequest):
            await self._send_model(session, msg)
        elif isinstance(msg, Update):
            await self._on_update(session, msg)
        elif isinstance(msg, Bye):
            if self.sessions.get(session.node_id) is session:
                self.governor.leave(session.node_id)  # a clean leave: the stake returns when the round closes
            self.detach(session)
        else:
            self.peer_log.warning("ignoring %s from %s", msg.TYPE, session.node_id[:12])

    async def _send_model(self, session: NodeSession, req: ModelRequest) -> None:
        if req.model_hash != self.model_hash:
            await self._send(session, UpdateResult(req.round, False, "the requested model is not current", "stale"))
            return
        if session.link is None:
            return
        try:
            await session.link.send_payload("model", self._params_bytes,
                                            {"round": self.round, "model_hash": self.model_hash})
        except LinkClosed:
            self.detach(session)

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

    def _round_of(self, update_round: int) -> Assignments | None:
        """What was assigned in that round, if it is recent enough to be remembered (ASSIGNMENTS_KEPT rounds)."""
        return self._assigned.get(update_round)

    def _decided(self, node_id: str, update_round: int) -> bool:
        """Whether an update of this node for this round was already heard: one decision per (node, round), ever,
        across restarts too (committed decisions are in the store)."""
        key = (node_id, update_round)
        rnd = self._open
        if rnd is not None and (key in rnd.outcomes or node_id in rnd.decided(update_round)):
            return True
        if any((p.update.node_id, p.update.round) == key for p in self._pending_payloads.values()):
            return True
        if any((p.update.node_id, p.update.round) == key for _, _, _, p in self._deferred):
            return True
        return self.store.update_decided(node_id, update_round)

    def _claims_rejection(self, session: NodeSession, u: Update) -> tuple[str, str] | None:
        """(rule, reason) when what the update claims could not have been done for its assignment: more steps or
        tokens than it was given, or more training time than has passed since it was sent."""
        rnd = self._round_of(u.round)
        if rnd is None or session.node_id not in rnd.assignments:
            return "not_assigned", f"this node was given no assignment for round {u.round + 1}"
        seq = int(rnd.config["seq_len"])
        steps, batch = int(rnd.config["inner_steps"]), int(rnd.config["batch_size"])
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
        if self.finished:
            return "no_round", "the job has finished"
        # self.round is the open round's number, or the next one's between a commit and its opening: an update
        # that arrives then waits for that round (on_payload), like one that arrives while a round closes
        known = {self.round: self.model_hash, self.round - 1: self.previous_hash}
        if u.round in known and u.model_hash != known[u.round]:
            return "model_hash", f"update for round {u.round} names another model than that round's"
        if u.round > self.round:
            return "model_hash", f"round {u.round} has not opened"
        if u.num_values != self.n_params:
            return "shape", f"update has {u.num_values} values, the model has {self.n_params}"
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
            await self._send(session, UpdateResult(u.round, False, unsigned[1], unsigned[0]))
            return
        if self._decided(u.node_id, u.round):  # a replay, or a second update for the same round: never booked
            await self._send(session, UpdateResult(u.round, False, f"an update of this node for round {u.round + 1} "
                                                                   "was already received", "replay"))
            return
        rejection = self._early_rejection(session, u)
        if rejection is not None:
            await self._reject(session, u, *rejection)
            return
        self._expire_pending()
        if sum(p.session is session for p in self._pending_payloads.values()) >= PENDING_PER_NODE:
            await self._send(session, UpdateResult(u.round, False, f"{PENDING_PER_NODE} announced updates are still "
                                                                   "waiting for their bytes", "pending"))
            return
        weight = 1.0 if u.round == self.round else STALE_WEIGHT
        self._pending_payloads[(session.node_id, u.transfer_id)] = PendingUpdate(u, session, weight, time.time())

    def _expire_pending(self) -> None:
        """Drop announced updates whose bytes did not arrive in time, and free what they held."""
        now = time.time()
        for key, pending in list(self._pending_payloads.items()):
            if now > pending.expires_at:
                del self._pending_payloads[key]
                log.info("dropped the update of %s for round %d: its payload did not arrive in time",
                         key[0][:12], pending.update.round + 1)

    async def on_payload(self, session: NodeSession, header: PayloadHeader, data: bytes) -> None:
        if not self._intake_open(session):
            return
        pending = self._pending_payloads.pop((session.node_id, header.transfer_id), None)
        if pending is None:
            return  # its Update was rejected before the bytes arrived (and the node was told)
        u = pending.update
        if header.sha256 != u.payload_sha256 or header.kind != "update":
            await self._reject(session, u, "integrity", "payload does not match the signed update")
            return
        rnd = self._open
        if (rnd is None or rnd.closing) and not self.finished:
            # the round is being aggregated (or the next not yet open): the update waits for the next round,
            # where it counts as a late one; taken now, it would be told "accepted" and never aggregated
            self._deferred.append((session, header, data, pending))
            return
        if rnd is None:
            await self._reject(session, u, "no_round", "the job has finished")
            return
        try:
            values = decode_numpy(compress.CodecSpec.from_dict(u.codec), data, u.num_values)
        except compress.CodecError as e:
            await self._reject(session, u, "codec", str(e))
            return
        with np.errstate(over="ignore", invalid="ignore"):
            norm = float(np.linalg.norm(values.astype(np.float64)))
        decision = self.governor.check_update(rnd.round, u.node_id, {
            "pseudo_gradient_norm": norm, "loss": u.loss_last, "numel": int(values.size),
            "expected_numel": self.n_params, "updates_this_round": int(session.node_id in rnd.decided(u.round)),
            "staleness": rnd.round - u.round, "tokens": u.tokens})
        if not decision.allowed:
            if (session.node_id, u.round) not in rnd.outcomes:
                rnd.outcomes[(session.node_id, u.round)] = (decision, u.tokens)
            await self._reject(session, u, ",".join(decision.blocked_by), "; ".join(decision.reasons))
            return
        record = self._record(u, True, "", len(data), pending.weight)
        rnd.accepted.append(AcceptedUpdate(values, pending.weight, record, u, decision))
        rnd.records.append(record)
        rnd.decided(u.round).add(session.node_id)
        rnd.outcomes[(session.node_id, u.round)] = (decision, u.tokens)
        rnd.bytes_received += len(data)
        received = time.time()
        seconds = u.seconds
        known_speed = self.node_speed.get(u.node_id)
        if known_speed and seconds > 0 and u.tokens / seconds > SPEED_JUMP * known_speed:
            seconds = u.tokens / (SPEED_JUMP * known_speed)  # a claimed leap in speed is read at the bound
        batch = u.tokens // (u.inner_steps * int(rnd.config["seq_len"]))
        rnd.reports.append(NodeReport(u.node_id, u.inner_steps, batch, seconds,
                                      max(0.0, received - rnd.opened_at - seconds), received <= rnd.deadline))
        session.state = "submitted"
        if seconds > 0:
            self.node_speed[u.node_id] = u.tokens / seconds
        await self._send(session, UpdateResult(u.round, True))
        log.info("round %d: accepted update from %s (%s, H=%d, %d tokens, loss %.3f -> %.3f, norm %.3g, %d bytes)",
                 rnd.round + 1, session.node_id[:12], session.kind, u.inner_steps, u.tokens, u.loss_first, u.loss_last,
                 norm, len(data))
        self._changed.set()

    def _record(self, u: Update, accepted: bool, reason: str, nbytes: int, weight: float) -> UpdateRecord:
        return UpdateRecord(u.round, u.node_id, accepted, reason, u.tokens, u.inner_steps, u.loss_first, u.loss_last,
                            nbytes, weight, time.time())

    async def _reject(self, session: NodeSession, u: Update, rule: str, reason: str) -> None:
        self.peer_log.warning("round %d: rejected update from %s: [%s] %s", u.round + 1, session.node_id[:12], rule,
                              reason)
        rnd = self._open
        if rnd is not None and session.node_id not in rnd.decided(u.round):
            rnd.records.append(self._record(u, False, f"{rule}: {reason}", u.payload_bytes, 0.0))
            rnd.decided(u.round).add(session.node_id)
        await self._send(session, UpdateResult(u.round, False, reason, rule))
        self._changed.set()

    # -- rounds -------------------------------------------------------------------------------------------

    def _ready_sessions(self) -> list[NodeSession]:
        return [s for s in self.sessions.values() if s.link is not None and s.state != "left"]

    def _round_complete(self, rnd: OpenRound) -> bool:
        waiting = [s for s in self._ready_sessions() if s.node_id in rnd.assignments and s.node_id not in rnd.reported]
        return bool(rnd.accepted) and (not waiting or time.time() >= rnd.deadline)

    @property
    def max_payload(self) -> int:
        """The most bytes one payload from a node may take: an fp32 update with room to spare, or the job codec's
        worst case where that is larger (top-k of more than half the values, say)."""
        return max(int(4 * self.n_params * PAYLOAD_SLACK), compress.max_wire_size(self.codec, self.n_params)) + 1024

    def round_config(self) -> dict:
        """What nodes run this round: the governed parameters in force and the policy's deadline."""
        p = self.governor.params
        return {"inner_steps": int(p["inner_steps"]), "lr": float(p["lr"]), "weight_decay": self.job.weight_decay,
                "batch_size": int(p["batch"]), "seq_len": self.cfg.block_size,
                "codec": self.codec.to_dict(), "deadline_s": self.deadline_seconds}

    async def run(self) -> None:
        """Open, wait for and close rounds until the job's round count is reached (forever when 0)."""
        while not self.finished:
            if self.job.rounds and self.round >= self.job.rounds:
                await self._finish()
                return
            while not self._ready_sessions():
                self._changed.clear()
                await self._changed.wait()
            self._expire_pending()
            now = time.time()
            rnd = OpenRound(self.round, now, now + self.deadline_seconds, config=self.round_config())
            self._assigned[rnd.round] = Assignments(rnd.opened_at, rnd.config, rnd.assignments, rnd.assigned_at)
            for old in [r for r in self._assigned if r <= rnd.round - ASSIGNMENTS_KEPT]:
                del self._assigned[old]
            self._open = rnd
            # logs count rounds as status does: round N is the one whose commit completes N rounds
            log.info("round %d open: %d node(s), H=%d, deadline in %.1fs", rnd.round + 1, len(self._ready_sessions()),
                     rnd.config["inner_steps"], self.deadline_seconds)
            for s in self._ready_sessions():
                await self._assign(s, rnd)
            await self._replay_deferred(rnd)
            while not self._round_complete(rnd):
                if time.time() >= rnd.deadline and not rnd.accepted:
                    rnd.deadline = time.time() + self.deadline_seconds  # nothing arrived: keep waiting
                    log.info("round %d: no update by the deadline; extended", rnd.round + 1)
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.05, rnd.deadline - time.time()))
                except asyncio.TimeoutError:
                    pass
            try:
                await self._close_round(rnd)
            except Exception as e:  # noqa: BLE001 - a round's failure must never stop the coordinator
                await self._abandon_round(rnd, e)

    async def _replay_deferred(self, rnd: OpenRound) -> None:
        """Decide the updates that arrived while the last round closed, in the round now open."""
        deferred, self._deferred = self._deferred, []
        for session, header, data, pending in deferred:
            if session.state == "left":
                continue
            weight = 1.0 if pending.update.round == rnd.round else STALE_WEIGHT
            self._pending_payloads[(session.node_id, header.transfer_id)] = replace(pending, weight=weight)
            await self.on_payload(session, header, data)

    def _aggregate(self, rnd: OpenRound) -> tuple[np.ndarray | None, list[int]]:
        """The aggregate of the accepted updates and the indices the rule discarded as outliers (None when the
        round's close judged every update a copy or a fake)."""
        if not rnd.accepted:
            return None, []
        matrix = np.stack([a.values for a in rnd.accepted])
        weights = [a.weight for a in rnd.accepted]
        name = str(self.governor.params["aggregator"])
        n = len(weights)
        f = int(n * self.job.byzantine_fraction)
        try:
            if name == "mean":
                result = aggregation.RULES["mean"](matrix, weights)
            else:
                if name in ("krum", "multikrum"):
                    f = min(f, max(0, (n - 3) // 2))
                result = aggregation.RULES[name](matrix, None, f)
        except AggregationError as e:  # too few updates for the rule's f: average this round, and say so
            log.warning("round %d: %s cannot aggregate %d update(s) (%s); using the mean", rnd.round + 1, name, n, e)
            result = aggregation.RULES["mean"](matrix, weights)
        values = result.values.numpy() if isinstance(result.values, torch.Tensor) else np.asarray(result.values)
        return values.astype(np.float32), list(result.discarded)

    # -- paying only for distinct, verified work ------------------------------------------------------------

    def _judge(self, rnd: OpenRound) -> None:
        """Before aggregation: pay only for distinct, verified work. An update that nearly copies an earlier one of
        the round (from another key) is a suspect; suspects, then each node's first update, then a sampled share
        are re-executed from their own assignments. One that does not reproduce is slashed, with the evidence; a
        suspect that was not re-executed is paid nothing and costs its sender reputation, while one that
        reproduces is honest agreement and stays. Overruled updates leave the aggregate. Runs in a worker thread."""
        found = copies.find_copies([a.values for a in rnd.accepted], [a.update.codec for a in rnd.accepted])
        kept = [a for i, a in enumerate(rnd.accepted) if i not in found]
        # (update, the one it copies, the measure)
        suspects = [(rnd.accepted[i], rnd.accepted[j], measure) for i, (j, measure) in sorted(found.items())]
        for a in self._spot_check_sample(rnd, kept, [s for s, _, _ in suspects]):
            verdict = self._spot_check(rnd, a)
            if verdict is None:
                continue
            if verdict.ok:
                a.verified = True
                continue
            self._overrule(rnd, a, "spot-check", "the update does not reproduce from its assignment "
                           f"(cosine {verdict.cosine:.3f}, relative error {verdict.relative_error:.3f})", slash=True,
                           evidence={"spot_check": verdict.evidence})
        for a, original, measure in suspects:
            if not a.verified and a.verdict.allowed:
                self._overrule(rnd, a, "distinct-work", f"a near-copy of the update of {original.record.node_id[:12]}… "
                               f"in this round ({measure})", slash=False,
                               evidence={"copy_of": original.record.node_id, "measure": measure})
        rnd.accepted = [a for a in rnd.accepted if a.verdict.allowed]

    def _spot_check(self, rnd: OpenRound, a: AcceptedUpdate):
        """Re-execute one update from its assignment and judge it; None when the check itself could not run (our
        failure, never the node's: the update then stays, unverified)."""
        seq = int(rnd.config["seq_len"])
        try:
            recomputed = spot_check.reexecute(
                self.cfg, self.params.numpy(), self.corpus.shard(rnd.assignments[a.record.node_id]),
                a.record.node_id, a.update.round, a.update.inner_steps, a.update.tokens // (a.update.inner_steps * seq),
                seq, float(rnd.config["lr"]), float(rnd.config.get("weight_decay", 0.0)))
            return spot_check.judge(a.values, recomputed, a.update.codec)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.error("round %d: the spot check of %s could not run: %s", rnd.round + 1, a.record.node_id[:12], e)
            return None

    def _spot_check_sample(self, rnd: OpenRound, kept: list[AcceptedUpdate],
                           suspects: list[AcceptedUpdate]) -> list[AcceptedUpdate]:
        """Which updates to re-execute, at most MAX_SPOT_CHECKS a round, of those computed on this round's model
        (their start is at hand): suspected copies first, then the updates of nodes without reputation (a node's
        first verified update pays its start grant and earns its first voting weight), then those a keyed hash
        samples at the job's verify share. None when the share is 0."""
        if self.job.verify_share <= 0:
            return []
        on_time = [a for a in suspects + kept if a.update.round == rnd.round]
        first = [a for a in on_time if a in suspects or self.governor.reputation[a.record.node_id] <= 0]
        sampled = [a for a in on_time if a not in first and self._sampled(a)]
        return (first + sampled)[:MAX_SPOT_CHECKS]

    def _sampled(self, a: AcceptedUpdate) -> bool:
        digest = hashlib.sha256(self._spot_check_salt + f"{a.record.node_id}:{a.update.round}".encode()).digest()
        return int.from_bytes(digest[:8], "little") < self.job.verify_share * 2**64

    def _overrule(self, rnd: OpenRound, a: AcceptedUpdate, rule: str, reason: str, slash: bool,
                  evidence: dict) -> None:
        """Turn an update accepted on arrival into one blocked by `rule`, in the round's books and audit log."""
        decision = Decision("update", (Verdict(rule, False, reason, slash),))
        a.verdict = decision
        key = (a.record.node_id, a.update.round)
        rnd.outcomes[key] = (decision, a.update.tokens)
        rnd.evidence[key] = evidence
        index = next(i for i, r in enumerate(rnd.records) if r is a.record)
        rnd.records[index] = replace(a.record, accepted=False, reason=f"{rule}: {reason}", weight=0.0)
        self.governor.governance.audit.append_decision(decision, round=rnd.round, subject=a.record.node_id,
                                                       detail=evidence)
        log.warning("round %d: overruled the update of %s: [%s] %s", rnd.round + 1, a.record.node_id[:12], rule,
                    reason)

    async def _close_round(self, rnd: OpenRound) -> None:
        rnd.closing = True
        await asyncio.to_thread(self._judge, rnd)  # copies and spot checks leave before anything is aggregated
        grad, discarded = await asyncio.to_thread(self._aggregate, rnd)  # seconds at d = 10M: off the event loop
        val_loss, ckpt, path, sha, qualities = await asyncio.to_thread(self._apply_and_checkpoint, rnd, grad)
        new_round = rnd.round + 1
        # the books: every decided update, then the rules for the next round, then the next deadline
        accepted = {(a.record.node_id, a.update.round): (i, a) for i, a in enumerate(rnd.accepted)}
        outcomes = []
        for key, (decision, tokens) in rnd.outcomes.items():
            index, a = accepted.get(key, (None, None))
            outcomes.append(UpdateOutcome(key[0], decision, tokens, qualities[index] if index is not None else 0,
                                          index is not None and index not in discarded,
                                          verified=a is not None and (a.verified or self.job.verify_share == 0),
                                          memo=rnd.evidence.get(key)))  # with checks off, accepted work is trusted
        # each record keeps what its reward was computed from, so that `ledger verify` can recompute it
        reward_inputs = {id(a.record): (qualities[i], i not in discarded) for i, a in enumerate(rnd.accepted)}
        rnd.records = [replace(r, quality_ppm=reward_inputs[id(r)][0], aggregated=reward_inputs[id(r)][1])
                       if id(r) in reward_inputs else r for r in rnd.records]
        entries = self.governor.settle(new_round, outcomes)  # booked under the round they commit with
        for node_id, why in self.governor.failures:
            self.intake_errors += 1
            log.error("round %d: the books refused an entry for %s and the round commits without it: %s",
                      new_round, node_id[:12], why)
        changes = self.governor.boundary(new_round)
        for change in changes:
            log.info("governance: %s %s -> %s takes effect in round %d", change.kind, change.target, change.after,
                     new_round)
        self._adapt(rnd)
        tokens = sum(r.tokens for r in rnd.records if r.accepted)
        rejected = sum(1 for r in rnd.records if not r.accepted)
        head = self.governor.ledger.head
        record = RoundRecord(new_round, ckpt.model_hash, path.name, sha, val_loss, len(rnd.accepted), rejected,
                             tokens, rnd.bytes_received, rnd.opened_at, time.time(), rnd.deadline, head,
                             self.key.sign(round_record_bytes(new_round, ckpt.model_hash, head)))
        books = self.governor.snapshot()
        self.store.commit_round(record, rnd.records, books["ledger"], self.governor.ledger.balances(), books["meta"],
                                books["proposals"])
        self.governor.committed()
        # only after the commit does the new model become current
        self.previous_hash, self.model_hash = self.model_hash, ckpt.model_hash
        self.params, self.momentum = torch.from_numpy(ckpt.params), torch.from_numpy(ckpt.momentum)
        self._params_bytes = np.ascontiguousarray(ckpt.params, "<f4").tobytes()
        self.round = new_round
        self._open = None
        self._prune_checkpoints()
        log.info("round %d committed: %d accepted, %d rejected, validation loss %.4f", self.round, len(rnd.accepted),
                 rejected, val_loss)
        for entry in entries:
            session = self.sessions.get(entry.node)
            if session is not None and entry.kind in ("reward", "slash"):
                await self._send(session, Receipt(entry.to_dict(), self.governor.sign_receipt(entry)))
        for s in self._ready_sessions():
            await self._send(s, RoundClosed(self.round, val_loss, len(rnd.accepted), rejected))
        for node_id, decision in list(self.policy.quarantined.items()):
            session = self.sessions.get(node_id)
            if session is not None:
                await self.remove(session, Error("quarantined", "; ".join(decision.reasons), fatal=True))

    async def _abandon_round(self, rnd: OpenRound, error: BaseException) -> None:
        """A round whose close failed is not committed: the books go back to the last commit, the nodes are told,
        and the next round opens on the same model. The coordinator carries on."""
        self.intake_errors += 1
        if self.round > rnd.round:  # it failed after its commit: the round counts, and the books are right
            log.error("after committing round %d", self.round, exc_info=error)
            return
        log.error("round %d could not be closed and is abandoned; the next round opens on the same model",
                  rnd.round + 1, exc_info=error)
        self.governor = Governor(self.store, self.key, self.job.governed(), None)  # the committed books, reloaded
        self._open = None
        for a in rnd.accepted:
            session = self.sessions.get(a.record.node_id)
            if session is not None:
                await self._send(session, Error("round_abandoned", f"round {rnd.round + 1} could not be committed; "
                                                "its updates do not count"))

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

    def _apply_and_checkpoint(self, rnd: OpenRound, grad: np.ndarray):
        """Outer step, validation, per-update quality and the checkpoint (in a worker thread). With no aggregate
        (every update was judged a copy or a fake) the model and its momentum stay as they are."""
        p = self.governor.params
        qualities = self._qualities(rnd)
        if grad is None:
            params = self.params.clone()
            momentum = torch.zeros_like(params) if self.momentum is None else self.momentum.clone()
        else:
            g = torch.from_numpy(np.ascontiguousarray(grad, np.float32))
            params, momentum = outer_nesterov_step(self.params, g, self.momentum, float(p["outer_lr"]),
                                                   float(p["outer_momentum"]))
        load_flat_parameters(self._model, params)
        val_loss = evaluate(self._model, self._val_batches)
        ckpt = Checkpoint(rnd.round + 1, params.numpy(), momentum.numpy())
        path, sha = write_checkpoint(self.data_dir / "checkpoints", ckpt)
        return val_loss, ckpt, path, sha, qualities

    def _qualities(self, rnd: OpenRound) -> list[int]:
        """Each accepted update's quality in ppm: the loss drop it makes alone on a held-out batch (one outer
        SGD step), relative to the best update of the round. An update that does not lower the loss scores 0."""
        lr = float(self.governor.params["outer_lr"])
        load_flat_parameters(self._model, self.params)
        base = evaluate(self._model, self._quality_batch)
        drops = []
        for a in rnd.accepted:
            load_flat_parameters(self._model, self.params - lr * torch.from_numpy(a.values))
            drops.append(base - evaluate(self._model, self._quality_batch))
        best = max(drops, default=0.0)
        return [quality_to_ppm(d / best) if best > 0 else 0 for d in drops]

    def _prune_checkpoints(self) -> None:
        """Keep as many recent checkpoints as the storage rules allow (the newest is always kept)."""
        high = self.governor.governance.rules.bounds("storage", "checkpoints_kept").high
        kept = max(1, int(high)) if high is not None else CHECKPOINTS_KEPT
        directory = self.data_dir / "checkpoints"
        for path in sorted(directory.glob("round-*.ckpt"))[:-kept]:
            if path.name != "round-000000.ckpt":  # the initial model stays: it defines the job's start
                path.unlink(missing_ok=True)

    async def _finish(self) -> None:
        self.finished = True
        log.info("job finished after %d rounds", self.round)
        deferred, self._deferred = self._deferred, []
        for session, _, _, pending in deferred:
            await self._reject(session, pending.update, "no_round", "the job finished before the update could count")
        for s in self._ready_sessions():
            await self._send(s, Bye("job finished"))

    # -- reporting ----------------------------------------------------------------------------------------

    def status(self) -> dict:
        rounds = self.store.rounds()
        stored = {n["id"]: n for n in self.store.nodes()}
        nodes = []
        for node_id, n in stored.items():
            live = self.sessions.get(node_id)
            state = live.state if live else "offline"
            if node_id in self.policy.quarantined:
                state = "quarantined"
            nodes.append({"id": node_id, "kind": n["kind"], "agent": n["agent"], "state": state,
                          "path": live.link.path if live and live.link else None, "last_path": n["last_path"],
                          "updates_accepted": n["updates_accepted"], "updates_rejected": n["updates_rejected"],
                          "tokens": n["tokens"], "last_seen": n["last_seen"],
                          "tokens_per_second": self.node_speed.get(node_id),
                          "reputation": self.governor.reputation[node_id],
                          "balance": self.governor.ledger.balance(node_id),
                          "stake": self.governor.ledger.stake_of(node_id)})
        last = rounds[-1] if rounds else None
        open_round = None
        if self._open is not None:
            open_round = {"round": self._open.round, "deadline": self._open.deadline,
                          "assigned": len(self._open.assignments), "reported": len(self._open.reported)}
        return {
            "round": self.round,
            "val_loss": None if last is None else last.val_loss,
            "model_hash": self.model_hash,
            "state": "finished" if self.finished else "training",
            "open_round": open_round,
            "coordinator_id": self.key.node_id,
            "intake": {"pending_payloads": len(self._pending_payloads), "deferred": len(self._deferred),
                       "errors": self.intake_errors},
            "job": self.describe(),
            "history": [{"round": r.round, "val_loss": r.val_loss, "accepted": r.accepted, "rejected": r.rejected,
                         "tokens": r.tokens, "bytes": r.bytes_received, "model_hash": r.model_hash,
                         "closed_at": r.closed_at} for r in rounds],
            "nodes": nodes,
        }


def outer_nesterov_step(params: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor | None, lr: float,
                        mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD(nesterov=True, dampening=0) on a pseudo-gradient; the math of shared.diloco.OuterNesterov."""
    buf = grad.clone() if momentum is None else momentum * mu + grad
    return params - lr * (grad + mu * buf), buf


def new_nonce() -> str:
    return secrets.token_hex(32)

