"""The coordinator's round logic: assignments, update validation, aggregation, the outer step and commits.

It knows nothing of transports: sessions hand it messages and payloads, and it answers through each session's
link. Never let a rejected update touch the pending aggregate, the model or the store (except as a record).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from server.checkpoint import Checkpoint, checkpoint_path, model_hash, read_checkpoint, write_checkpoint
from server.corpus import Corpus
from server.keys import NodeKey, SignatureError, verify
from server.link import Link, LinkClosed
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from server.store import RoundRecord, Store, UpdateRecord
from server.training import evaluate, validation_batches
from shared import compress
from shared.diloco import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM
from shared.identity import signing_bytes
from shared.model import model_config, num_parameters
from shared.wire import Bye, Message, ModelRequest, PayloadHeader, RoundClosed, RoundOpen, Update, UpdateResult

log = logging.getLogger("swarmgrad.coordinator")

STALE_WEIGHT = 0.5  # an update computed on the previous round's model counts once, at this weight
CHECKPOINTS_KEPT = 5


class JobMismatch(Exception):
    """The data directory holds a different job than the one asked for on the command line."""


@dataclass(frozen=True)
class JobConfig:
    """One training job. Stored in the data directory on first start; a restart resumes the stored job."""

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
    codec: str = "fp32"
    seed: int = 0
    max_update_norm: float = 1e4  # a pseudo-gradient longer than this is rejected

    def __post_init__(self) -> None:
        model_config(self.model)  # KeyError naming the known sizes
        if self.inner_steps < 1 or self.batch_size < 1 or self.round_deadline <= 0 or self.rounds < 0:
            raise ValueError("inner_steps and batch_size must be >= 1, round_deadline > 0, rounds >= 0")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: {', '.join(AGGREGATORS)}")

    def round_config(self) -> dict:
        cfg = model_config(self.model)
        return {"inner_steps": self.inner_steps, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "seq_len": cfg.block_size, "codec": {"name": self.codec, "params": {}},
                "deadline_s": self.round_deadline}

    def describe(self) -> dict:
        cfg = model_config(self.model)
        return {"model": self.model, "config": cfg.to_dict(), "params": num_parameters(cfg),
                "inner_steps": self.inner_steps, "rounds": self.rounds, "aggregator": self.aggregator,
                "codec": self.codec}


@dataclass(eq=False)
class NodeSession:
    """A connected node as the coordinator sees it. The signaling layer sets `link` once a path is up."""

    node_id: str
    kind: str
    agent: str = ""
    link: Link | None = None
    state: str = "connecting"  # connecting -> ready -> training -> submitted; left
    connected_at: float = field(default_factory=time.time)


@dataclass
class PendingUpdate:
    update: Update
    session: NodeSession
    weight: float
    received_at: float


@dataclass
class OpenRound:
    round: int
    opened_at: float
    deadline: float
    assignments: dict[str, int] = field(default_factory=dict)  # node id -> shard
    reported: set[str] = field(default_factory=set)  # node ids whose update for this round was decided
    accepted: list[tuple[np.ndarray, float, UpdateRecord]] = field(default_factory=list)
    records: list[UpdateRecord] = field(default_factory=list)
    bytes_received: int = 0


class Coordinator:
    def __init__(self, data_dir: Path, job: JobConfig, corpus: Corpus, store: Store | None = None):
        self.data_dir = data_dir
        self.store = store or Store(data_dir / "state.db")
        self.key = NodeKey.load_or_create(data_dir / "coordinator.key")
        self.corpus = corpus
        self.job = self._load_job(job)
        self.cfg = model_config(self.job.model)
        self.n_params = num_parameters(self.cfg)
        self.codec = compress.CodecSpec(self.job.codec)
        self.sessions: dict[str, NodeSession] = {}
        self.finished = False
        self._changed = asyncio.Event()
        self._open: OpenRound | None = None
        self._pending_payloads: dict[tuple[str, int], PendingUpdate] = {}
        self._model = GPT(self.cfg)
        self._val_batches = validation_batches(corpus.validation, self.cfg.block_size)
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
        # operational settings may change across restarts; the model may not
        merged = JobConfig(**{**stored, "rounds": job.rounds, "round_deadline": job.round_deadline,
                              "inner_steps": job.inner_steps})
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
            self.store.commit_round(RoundRecord(0, ckpt.model_hash, path.name, sha, val, 0, 0, 0, 0, now, now), [])
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

    def model_signature(self, round_: int, hash_: str) -> str:
        return self.key.sign(signing_bytes("model", {"round": round_, "model_hash": hash_}))

    # -- sessions -----------------------------------------------------------------------------------------

    def admit(self, node_id: str, kind: str) -> str | None:
        """The admission hook: None to admit, or the reason for refusing. Governance plugs in here."""
        if self.finished:
            return "the job is finished"
        return None

    def attach(self, session: NodeSession) -> None:
        old = self.sessions.get(session.node_id)
        if old is not None and old is not session:
            old.state = "left"  # a reconnect replaces the old session; its link is dead or about to be
        self.sessions[session.node_id] = session
        self.store.touch_node(session.node_id, session.kind, session.agent)

    def detach(self, session: NodeSession) -> None:
        if self.sessions.get(session.node_id) is session:
            session.state = "left"
            del self.sessions[session.node_id]
            self._changed.set()

    async def node_ready(self, session: NodeSession) -> None:
        """The session's link is up: give it work if a round is open."""
        session.state = "ready"
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
        msg = RoundOpen(rnd.round, self.model_hash, self.model_signature(rnd.round, self.model_hash),
                        self.job.round_config(), shard, rnd.deadline)
        if await self._send(session, msg):
            session.state = "training"

    # -- messages from nodes ------------------------------------------------------------------------------

    async def on_message(self, session: NodeSession, msg: Message) -> None:
        if isinstance(msg, ModelRequest):
            await self._send_model(session, msg)
        elif isinstance(msg, Update):
            await self._on_update(session, msg)
        elif isinstance(msg, Bye):
            self.detach(session)
        else:
            log.warning("ignoring %s from %s", msg.TYPE, session.node_id[:12])

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

    def _early_rejection(self, session: NodeSession, u: Update) -> tuple[str, str] | None:
        """(rule, reason) if the update cannot be accepted whatever its payload holds; checked before the bytes."""
        if u.node_id != session.node_id:
            return "identity", "update signed for another node id"
        try:
            verify(u.node_id, signing_bytes("update", u.signing_fields()), u.signature)
        except SignatureError as e:
            return "signature", str(e)
        rnd = self._open
        current = rnd.round if rnd else self.round
        if u.round == current and u.model_hash == self.model_hash:
            pass
        elif u.round == current - 1 and u.model_hash == self.previous_hash:
            pass  # stale by one round: accepted once, discounted
        else:
            return "staleness", f"update for round {u.round} is too old or names an unknown model"
        if rnd is None or session.node_id in rnd.reported:
            return "one_update_per_round", "this node already sent an update for this round"
        if u.num_values != self.n_params:
            return "shape", f"update has {u.num_values} values, the model has {self.n_params}"
        try:
            spec = compress.CodecSpec.from_dict(u.codec)
            expected = compress.encoded_size(spec, u.num_values)
        except compress.CodecError as e:
            return "codec", str(e)
        if u.payload_bytes != expected:
            return "shape", f"{spec.name} payload must be {expected} bytes, got {u.payload_bytes}"
        return None

    async def _on_update(self, session: NodeSession, u: Update) -> None:
        rejection = self._early_rejection(session, u)
        if rejection is not None:
            await self._reject(session, u, *rejection)
            return
        weight = 1.0 if u.round == self._open.round else STALE_WEIGHT
        self._pending_payloads[(session.node_id, u.transfer_id)] = PendingUpdate(u, session, weight, time.time())

    async def on_payload(self, session: NodeSession, header: PayloadHeader, data: bytes) -> None:
        pending = self._pending_payloads.pop((session.node_id, header.transfer_id), None)
        if pending is None:
            return  # its Update was rejected before the bytes arrived (and the node was told)
        u = pending.update
        if header.sha256 != u.payload_sha256 or header.kind != "update":
            await self._reject(session, u, "integrity", "payload does not match the signed update")
            return
        rnd = self._open
        if rnd is None or session.node_id in rnd.reported:
            await self._reject(session, u, "one_update_per_round", "this node already sent an update for this round")
            return
        try:
            values = decode_update(compress.CodecSpec.from_dict(u.codec), data, u.num_values)
        except compress.CodecError as e:
            await self._reject(session, u, "codec", str(e))
            return
        if not np.isfinite(values).all():
            await self._reject(session, u, "finite", "pseudo-gradient has NaN or infinite values")
            return
        norm = float(np.linalg.norm(values.astype(np.float64)))
        if norm > self.job.max_update_norm:
            await self._reject(session, u, "norm_bound", f"norm {norm:.3g} exceeds {self.job.max_update_norm:.3g}")
            return
        record = self._record(u, True, "", len(data), pending.weight)
        rnd.accepted.append((values, pending.weight, record))
        rnd.records.append(record)
        rnd.reported.add(session.node_id)
        rnd.bytes_received += len(data)
        session.state = "submitted"
        await self._send(session, UpdateResult(u.round, True))
        log.info("round %d: accepted update from %s (%s, %d tokens, loss %.3f -> %.3f, %d bytes)", rnd.round,
                 session.node_id[:12], session.kind, u.tokens, u.loss_first, u.loss_last, len(data))
        self._changed.set()

    def _record(self, u: Update, accepted: bool, reason: str, nbytes: int, weight: float) -> UpdateRecord:
        return UpdateRecord(u.round, u.node_id, accepted, reason, u.tokens, u.inner_steps, u.loss_first, u.loss_last,
                            nbytes, weight, time.time())

    async def _reject(self, session: NodeSession, u: Update, rule: str, reason: str) -> None:
        log.warning("round %d: rejected update from %s: [%s] %s", u.round, session.node_id[:12], rule, reason)
        rnd = self._open
        if rnd is not None and rule != "one_update_per_round":
            rnd.records.append(self._record(u, False, f"{rule}: {reason}", u.payload_bytes, 0.0))
            rnd.reported.add(session.node_id)
        await self._send(session, UpdateResult(u.round, False, reason, rule))
        self._changed.set()

    # -- rounds -------------------------------------------------------------------------------------------

    def _ready_sessions(self) -> list[NodeSession]:
        return [s for s in self.sessions.values() if s.link is not None and s.state != "left"]

    def _round_complete(self, rnd: OpenRound) -> bool:
        waiting = [s for s in self._ready_sessions() if s.node_id in rnd.assignments and s.node_id not in rnd.reported]
        return bool(rnd.accepted) and (not waiting or time.time() >= rnd.deadline)

    async def run(self) -> None:
        """Open, wait for and close rounds until the job's round count is reached (forever when 0)."""
        while not self.finished:
            if self.job.rounds and self.round >= self.job.rounds:
                await self._finish()
                return
            while not self._ready_sessions():
                self._changed.clear()
                await self._changed.wait()
            now = time.time()
            rnd = OpenRound(self.round, now, now + self.job.round_deadline)
            self._open = rnd
            log.info("round %d open: %d node(s), deadline in %.0fs", rnd.round, len(self._ready_sessions()),
                     self.job.round_deadline)
            for s in self._ready_sessions():
                await self._assign(s, rnd)
            while not self._round_complete(rnd):
                if time.time() >= rnd.deadline and not rnd.accepted:
                    rnd.deadline = time.time() + self.job.round_deadline  # nothing arrived: keep waiting
                    log.info("round %d: no update by the deadline; extended", rnd.round)
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.05, rnd.deadline - time.time()))
                except asyncio.TimeoutError:
                    pass
            await self._close_round(rnd)

    async def _close_round(self, rnd: OpenRound) -> None:
        updates = [v for v, _, _ in rnd.accepted]
        weights = [w for _, w, _ in rnd.accepted]
        grad = AGGREGATORS[self.job.aggregator](np.stack(updates), weights)
        val_loss, ckpt, path, sha = await asyncio.to_thread(self._apply_and_checkpoint, rnd.round + 1, grad)
        tokens = sum(r.tokens for r in rnd.records if r.accepted)
        rejected = sum(1 for r in rnd.records if not r.accepted)
        record = RoundRecord(rnd.round + 1, ckpt.model_hash, path.name, sha, val_loss, len(rnd.accepted), rejected,
                             tokens, rnd.bytes_received, rnd.opened_at, time.time())
        self.store.commit_round(record, rnd.records)
        # only after the commit does the new model become current
        self.previous_hash, self.model_hash = self.model_hash, ckpt.model_hash
        self.params, self.momentum = torch.from_numpy(ckpt.params), torch.from_numpy(ckpt.momentum)
        self._params_bytes = np.ascontiguousarray(ckpt.params, "<f4").tobytes()
        self.round = rnd.round + 1
        self._open = None
        self._prune_checkpoints()
        log.info("round %d committed: %d accepted, %d rejected, validation loss %.4f", self.round, len(rnd.accepted),
                 rejected, val_loss)
        for s in self._ready_sessions():
            await self._send(s, RoundClosed(self.round, val_loss, len(rnd.accepted), rejected))

    def _apply_and_checkpoint(self, new_round: int, grad: np.ndarray):
        g = torch.from_numpy(np.ascontiguousarray(grad, np.float32))
        params, momentum = outer_nesterov_step(self.params, g, self.momentum, self.job.outer_lr,
                                               self.job.outer_momentum)
        load_flat_parameters(self._model, params)
        val_loss = evaluate(self._model, self._val_batches)
        ckpt = Checkpoint(new_round, params.numpy(), momentum.numpy())
        path, sha = write_checkpoint(self.data_dir / "checkpoints", ckpt)
        return val_loss, ckpt, path, sha

    def _prune_checkpoints(self) -> None:
        for r in range(max(0, self.round - CHECKPOINTS_KEPT - 5), self.round - CHECKPOINTS_KEPT + 1):
            if r > 0:
                checkpoint_path(self.data_dir / "checkpoints", r).unlink(missing_ok=True)

    async def _finish(self) -> None:
        self.finished = True
        log.info("job finished after %d rounds", self.round)
        for s in self._ready_sessions():
            await self._send(s, Bye("job finished"))

    # -- reporting ----------------------------------------------------------------------------------------

    def status(self) -> dict:
        rounds = self.store.rounds()
        stored = {n["id"]: n for n in self.store.nodes()}
        nodes = []
        for node_id, n in stored.items():
            live = self.sessions.get(node_id)
            nodes.append({"id": node_id, "kind": n["kind"], "agent": n["agent"],
                          "state": live.state if live else "offline",
                          "path": live.link.path if live and live.link else None,
                          "updates_accepted": n["updates_accepted"], "updates_rejected": n["updates_rejected"],
                          "tokens": n["tokens"], "last_seen": n["last_seen"]})
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
            "job": self.job.describe(),
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


def weighted_mean(updates: np.ndarray, weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    return (w[:, None] * updates.astype(np.float64)).sum(0) / w.sum()


AGGREGATORS = {"mean": weighted_mean}


def decode_update(spec: compress.CodecSpec, data: bytes, n: int) -> np.ndarray:
    if compress.encoded_size(spec, n) != len(data):
        raise compress.CodecError(f"{spec.name} payload of {n} values must be {compress.encoded_size(spec, n)} bytes")
    if spec.name == "fp32":
        return np.frombuffer(data, "<f4").astype(np.float32)
    return np.asarray(compress.decode(spec, data, n), np.float32)


def new_nonce() -> str:
    return secrets.token_hex(32)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
