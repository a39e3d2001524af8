"""A training node's side of the protocol, written once: the PyTorch trainer, the browser tab and the simulator's
workers all run this state machine, and differ only in the small `NodePort` each one supplies.

One session: the signed handshake, the link (a WebRTC data channel, or the signaling WebSocket as fallback), then
rounds: check the assignment's signed model hash, fetch the model if it is not held, plan H and batch from the
round config (the autonomy loop), train from a fresh AdamW on the shared batch schedule, encode with error
feedback, sign and upload, and wait for the verdict (with overlapped rounds, take up the next round at once and book
the verdict when it arrives). Lost links reconnect with backoff. Every node handles a
refusal, quarantine, a rejected or non-finite update and the job's end the same way. Standard library only:
Pyodide runs it. Never upload an update computed on a model whose hash and signature were not checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import time
from dataclasses import dataclass
from typing import Any

from shared import compress
from shared.agent import RoundPlanner
from shared.batches import ScheduleError, batch_seed, batch_starts, tokens_allowed
from shared.identity import signing_bytes
from shared.manifest import Manifest, ManifestError, assemble, cut, sha256_hex
from shared.model import GPTConfig, num_parameters
from shared.rewards import LedgerError, check_receipt, receipt_bytes
from shared.swarm import Swarm, seeded
from shared.wire import (NODE_STATES, Bye, Challenge, Error, FrameReceiver, Hello, IceCandidate, ModelRequest,
                         NodeState, PathSelect, PayloadHeader, Receipt, RoundClosed, RoundOpen, RoundStats, Sdp,
                         Update, UpdateResult, Welcome, WireError, decode_message, payload_frames)

HANDSHAKE_TIMEOUT_S = 10.0
DATA_CHANNEL_TIMEOUT_S = 15.0  # then fall back to the WebSocket path (transport "auto")
RESULT_TIMEOUT_S = 120.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
# above this, a node that applies deltas value by value in Python (the browser, today) fetches snapshots instead:
# about a second per million values in Pyodide, while a snapshot comes over HTTP in well under that
DELTA_STDLIB_MAX_BYTES = 4 * 4_000_000
REMOVED_CODES = ("quarantined", "denied")  # a fatal Error with one of these ends the node: retrying cannot help
TRANSPORTS = ("auto", "webrtc", "websocket")
MIN_SHARE = 0.1  # the lowest GPU share (compute time over the inner steps' wall time) a user may choose
PAUSE_POLL_S = 0.1  # how soon a paused node notices Resume, Finish or Stop
_MODE_CHANGED = object()  # put in the inbox by pause/resume/finish, so that an idle node tells the coordinator


class NodeError(Exception):
    """Why a session ended."""


class Refused(NodeError):
    """The coordinator refused or removed this node (deny list, quarantine), or this node cannot train the job."""


class Disconnected(NodeError):
    """A link went away, or the coordinator said something this node cannot act on; reconnect."""


class JobFinished(NodeError):
    """The job ended, or this node has done the rounds it was asked to."""


class Stopped(NodeError):
    """The node was asked to stop (the user pressed Stop, the simulator churned it out)."""


class RoundDropped(NodeError):
    """The round in hand closed while this node was paused: its work is dropped, and the node carries on."""


class Phase(str, enum.Enum):
    JOINING = "joining"
    IDLE = "idle"
    FETCHING = "fetching"
    TRAINING = "training"
    UPLOADING = "uploading"
    AWAITING_VERDICT = "awaiting verdict"
    RECONNECTING = "reconnecting"
    LEFT = "left"


@dataclass(frozen=True)
class Ended:
    """How `Node.run` ended: `how` is "finished", "stopped" or "refused"."""

    how: str
    reason: str

    def __str__(self) -> str:
        return self.how if self.how == "stopped" else f"{self.how}: {self.reason}"


@dataclass(frozen=True)
class Sent:
    """An uploaded update whose verdict has not come: what booking it needs."""

    work: "Work"
    losses: list
    seconds: float
    received: float  # when the node took up the round
    model_hash: str  # the model it was computed on
    deadline_seconds: float
    overlapped: bool  # the node went on to the next round without waiting for it


@dataclass(frozen=True)
class Work:
    """One round's training as planned: what `NodePort.train` runs, from the global `model` it was given."""

    round: int
    steps: int
    batch: int
    seq_len: int
    lr: float
    weight_decay: float
    schedule: list  # batch_starts: starts[step][row] into `shard`
    shard: Any  # what NodePort.fetch_shard returned
    model: Any  # what NodePort.load_model returned for the round's model
    spec: compress.CodecSpec


class NodePort:
    """What differs between nodes. A driver subclasses it and overrides every method that raises here.

    Frames that arrive go to `node.feed(source, frame)` and a link that closes to `node.lost(source, reason)`;
    `source` is "signaling" (the WebSocket, also the fallback path) or "webrtc". Errors listed in `transient`
    are read as a lost connection (reconnect); anything else is a bug and propagates.
    """

    kind = "trainer"  # or "browser": what the coordinator shows
    agent = ""  # software and device, shown on the dashboard
    blob_url = ""  # where this node serves its held blobs over HTTP (Swarm.serve_direct), told in its Hello; "" if not
    name = ""  # the display name its owner chose, signed in its Hello (shared.wire.check_display_name); "" for none
    team = ""  # the team it counts for on the leaderboard, likewise
    transient: tuple[type[BaseException], ...] = (OSError,)
    # with overlapped rounds, fetch the round ahead's model from blobs while training the round in hand: only for a
    # port whose load_model and apply_delta make new objects (the model in training is never written to) and whose
    # training leaves the event loop free
    prefetches = False

    # identity
    async def sign(self, data: bytes) -> str:
        raise NotImplementedError

    async def verify(self, public_key: str, data: bytes, signature: str) -> bool:
        raise NotImplementedError

    # links
    async def connect(self, node: "Node") -> None:
        """Open the signaling socket; its frames go to node.feed("signaling", frame)."""
        raise NotImplementedError

    async def send_signal(self, text: str) -> None:
        raise NotImplementedError

    async def create_offer(self) -> str | None:
        """A WebRTC offer for a data channel to the coordinator; None when this node has no WebRTC."""
        return None

    async def accept_answer(self, sdp: str, timeout: float) -> bool:
        """Apply the answer; whether the data channel opened within `timeout` seconds (then it is the path)."""
        return False

    async def use_fallback(self) -> None:
        """Frames now go over the signaling socket; close any half-open peer connection."""

    async def send(self, frame: str | bytes) -> None:
        """One frame over the current path, waiting while its send buffer is full."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every link of this session."""

    # work
    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        """Get ready to train the job's model; raise Refused when this node cannot."""

    async def fetch_shard(self, index: int) -> Any:
        raise NotImplementedError

    async def fetch_blob(self, name: str) -> bytes | None:
        """A chunk or manifest by its sha256 from the coordinator's /api/blobs (or whatever serves them for it);
        None when it cannot. The node checks every byte against the name."""
        return None

    # peer links (shared/swarm.py): a data channel to another node, opened through the signaling relay. Frames that
    # arrive go to node.peer_frame(peer, frame); the port calls node.peer_opened(peer) when the channel opens and
    # node.peer_lost(peer, reason) when it closes.
    async def peer_offer(self, peer: str) -> str | None:
        """An offer for a data channel to `peer`; None when this node opens no peer links."""
        return None

    async def peer_answer(self, peer: str, offer: str) -> str | None:
        """Take `peer`'s offer; the answer, or None when this node takes no peer links."""
        return None

    async def peer_accept(self, peer: str, answer: str) -> None:
        """Apply `peer`'s answer to our offer."""

    async def peer_send(self, peer: str, frame: str | bytes) -> None:
        """One frame to `peer`, waiting while its send buffer is full; raises when the link is gone."""
        raise NotImplementedError

    async def peer_close(self, peer: str) -> None:
        """Close the link to `peer`, opened or not."""

    async def peer_fetch(self, url: str, name: str) -> bytes | None:
        """Blob `name` straight from a peer's blob URL (RoundOpen.peer_urls: `http://HOST:PORT`, from another node,
        so untrusted): GET {url}/blobs/{name}, with a bounded read and a short timeout. None when this node has no
        direct path to peers (this default; the blob then comes over the data channel) or the peer does not hold
        it; raises when the URL cannot be reached or does not answer as a blob server. The swarm checks the bytes."""
        return None

    def load_model(self, model_hash: str, data: bytes) -> Any:
        """The global model's little-endian float32 bytes, as this node keeps them."""
        return data

    def applies_delta(self, model: Any) -> bool:
        """Whether apply_delta can update this model (asked before the delta is fetched): this default can up to
        DELTA_STDLIB_MAX_BYTES; a node that cannot fetches the snapshot instead."""
        return isinstance(model, bytes) and len(model) <= DELTA_STDLIB_MAX_BYTES

    def apply_delta(self, model: Any, codec: compress.CodecSpec, data: bytes) -> tuple[Any, bytes] | None:
        """The model held plus an encoded delta's decoded values, in float32: (the new model as this node keeps
        it, its bytes); None when this node does not apply deltas (it then fetches snapshots). This default works
        on the bytes load_model keeps, in the standard library, up to DELTA_STDLIB_MAX_BYTES."""
        if not isinstance(model, bytes) or len(model) > DELTA_STDLIB_MAX_BYTES:
            return None
        new = compress.apply_delta(model, codec, data)
        return new, new

    async def before_training(self, node: "Node", work: Work) -> None:
        """Called when the round is ready to train, before its training time starts counting."""

    async def train(self, node: "Node", work: Work) -> list[float]:
        """work.steps AdamW steps from a fresh optimizer, from work.model, on the schedule; the losses. A port that
        offers pause and the GPU share awaits node.between_steps(work, seconds) before each group of steps."""
        raise NotImplementedError

    async def encode(self, node: "Node", work: Work) -> bytes:
        """The pseudo-gradient (global - local) encoded with work.spec and error feedback. Raises
        compress.CodecError when it is not finite (the residual then stays as it was)."""
        raise NotImplementedError

    def report(self, event: str, **fields: Any) -> None:
        """Progress for the user: events "state", "round", "model" (how the round's model arrived: source "delta",
        "blobs" or "link", its hash, and the bytes that came from peers and from the coordinator; for blobs, also
        from_peers_direct: of the bytes from peers, those fetched from their blob URLs), "uploaded" (with the hash
        of the model the update was computed on), "update", "round_closed", "receipt", "notice", "finished",
        "fatal", and "mode" (pause, resume, finish: `mode` is "paused", "active" or "finishing")."""


class Node:
    """One node's protocol. `run()` trains until the job ends, the node is stopped or refused, or `max_rounds`
    rounds are done; it reconnects with backoff on lost links."""

    def __init__(self, port: NodePort, node_id: str, transport: str = "auto", max_rounds: int = 0):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.port, self.node_id, self.transport, self.max_rounds = port, node_id, transport, max_rounds
        self.phase = Phase.JOINING
        self.planner = RoundPlanner()  # the autonomy loop: H and batch from measured speed and the deadline
        self.coordinator_id = ""
        self.job: dict | None = None
        self.cfg: GPTConfig | None = None
        self.model: Any = None  # the global model as port.load_model keeps it
        self.model_hash: str | None = None
        self.swarm = Swarm(node_id, port, port.report)
        self.shards: dict[int, Any] = {}
        self.rounds_done = self.accepted = self.rejected = self.skipped = 0
        self.balance: int | None = None  # micro-credits, from the newest verified receipt
        self.receipts: list[dict] = []  # verified ledger entries about this node
        self.path: str | None = None
        self.stopped = False
        self._welcomed = False
        self._transfer_id = 0
        self._trained: tuple[int, float, float] | None = None  # the last round trained: (round, assigned at, seconds)
        self._taken: tuple[int, str] | None = None  # the last assignment taken up: (round, model hash)
        self._awaiting: dict[int, Sent] = {}  # round -> the update sent for it, until its verdict is booked
        self._ahead: RoundOpen | None = None  # the newest assignment after the one in hand (overlapped rounds)
        self._prefetch: asyncio.Task | None = None  # fetching its model meanwhile (NodePort.prefetches)
        self._snapshot_manifest: asyncio.Task | None = None  # fetching the round's, while its delta comes
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._answer: asyncio.Future | None = None
        self._receivers: dict[str, FrameReceiver] = {}
        # the user's controls (see "controls" below): the mode the user chose (NODE_STATES) and the one the
        # coordinator last heard in this session; the GPU share; this round's rests, kept out of its compute time
        self.mode, self._told_mode = "active", "active"
        self.share = 1.0
        self._closed_round = -1  # the newest RoundClosed heard, as soon as it arrives
        self._rests_round: int | None = None
        self._paused_s = self._duty_s = 0.0

    # -- what the port calls -------------------------------------------------------------------------------

    def feed(self, source: str, frame: str | bytes) -> None:
        """One frame from the signaling socket or the data channel."""
        try:
            receiver = self._receivers.get(source)
            if receiver is not None:
                item = receiver.feed(frame)
            elif isinstance(frame, str):
                item = decode_message(frame)
            else:
                raise WireError("a binary frame arrived before the coordinator admitted this node")
        except WireError as e:
            self._inbox.put_nowait(Disconnected(f"bad frame from the coordinator on the {source} path: {e}"))
            return
        if isinstance(item, Sdp):
            if item.src != self.coordinator_id:
                self.swarm.spawn(self.swarm.on_signal(item))
            elif self._answer is not None and not self._answer.done() and item.sdp_type == "answer":
                self._answer.set_result(item)
        elif item is not None and not isinstance(item, IceCandidate):
            if isinstance(item, RoundClosed):  # read now: a node paused mid-round drops the round if it closed
                self._closed_round = max(self._closed_round, item.round)
            if isinstance(item, UpdateResult) and item.round in self._awaiting:
                self._book(item)  # booked on arrival: with overlapped rounds the node is training the next one
            if isinstance(item, RoundOpen):
                self._heard_ahead(item)
            self._inbox.put_nowait(item)

    def lost(self, source: str, reason: str) -> None:
        self._inbox.put_nowait(Disconnected(f"{source} closed: {reason}"))

    def peer_opened(self, peer: str) -> None:
        self.swarm.opened(peer)

    def peer_frame(self, peer: str, frame: str | bytes) -> None:
        self.swarm.frame(peer, frame)

    def peer_lost(self, peer: str, reason: str) -> None:
        self.swarm.lost(peer, reason)

    def stop(self) -> None:
        """Leave cleanly at the next opportunity: a goodbye to the coordinator, then the links close."""
        self.stopped = True
        self._inbox.put_nowait(Stopped("stopped"))

    # -- controls: pause, finish this round, the GPU share (the user's; any driver may offer them) -------------

    def pause(self) -> None:
        """Stop between inner steps, keeping the round's state; the coordinator is told, so that it assigns this
        node nothing and waits for nothing from it (no penalty) until resume()."""
        self._set_mode("paused")

    def resume(self) -> None:
        """Carry on after pause(): the round in hand if it is still open, else the coordinator's current one."""
        if self.mode == "paused":
            self._set_mode("active")

    def finish(self) -> None:
        """Send the update of the round in hand (of the next one, when none is), then leave as stop() does."""
        self._set_mode("finishing")

    def set_share(self, share: float) -> None:
        """The GPU share: between_steps rests so that compute time over the inner steps' wall time is `share`."""
        if not MIN_SHARE <= share <= 1.0:
            raise ValueError(f"the GPU share must lie in [{MIN_SHARE}, 1], not {share!r}")
        self.share = float(share)

    def _set_mode(self, mode: str) -> None:
        if mode not in NODE_STATES:
            raise ValueError(f"mode must be one of {NODE_STATES}, not {mode!r}")
        if mode != self.mode:
            self.mode = mode
            self._inbox.put_nowait(_MODE_CHANGED)  # an idle node tells the coordinator at once
            self.port.report("mode", mode=mode)

    async def between_steps(self, work: Work, compute_seconds: float = 0.0) -> None:
        """The port's hook between groups of inner steps (and before the first): `compute_seconds` is what the group
        just done took. Rests for the GPU share, tells the coordinator of a changed mode, and holds while paused.
        Raises Stopped, or RoundDropped when the round closed during a pause."""
        if self._rests_round != work.round:  # the round's first call: its rests start from nothing
            self._rests_round, self._paused_s, self._duty_s = work.round, 0.0, 0.0
        if self.stopped:
            raise Stopped("stopped")
        if compute_seconds > 0 and self.share < 1.0:
            started = time.monotonic()
            deadline = started + compute_seconds * (1.0 / self.share - 1.0)
            while self.mode != "paused" and not self.stopped and time.monotonic() < deadline:
                await asyncio.sleep(min(PAUSE_POLL_S, deadline - time.monotonic()))
            self._duty_s += time.monotonic() - started
        self._paused_s += await self._hold_while_paused(work.round)

    async def _hold_while_paused(self, round_: int) -> float:
        """Wait while paused (telling the coordinator first and after); the seconds it waited. RoundDropped when
        round `round_` closed meanwhile, Stopped on stop()."""
        started, paused = time.monotonic(), self.mode == "paused"
        await self._tell_mode()
        while self.mode == "paused" and not self.stopped:
            await asyncio.sleep(PAUSE_POLL_S)
        if self.stopped:
            raise Stopped("stopped")
        await self._tell_mode()  # (also when resumed while the pause was being told)
        if paused and self._closed_round > round_:
            raise RoundDropped(f"round {round_ + 1} closed while this node was paused; its work is dropped, and the "
                               "node carries on with the coordinator's current round")
        return time.monotonic() - started if paused else 0.0

    async def _tell_mode(self) -> None:
        """Tell the coordinator the mode, when it changed since it last heard, and a link is up to tell it on."""
        if self.mode != self._told_mode and self.phase not in (Phase.JOINING, Phase.RECONNECTING, Phase.LEFT):
            mode = self.mode  # (the user may change it again while it is being sent)
            await self._send(NodeState(mode).encode())
            self._told_mode = mode

    async def restore_receipts(self, coordinator_id: str, kept: list[dict]) -> None:
        """Receipts a driver kept from earlier sessions with coordinator `coordinator_id` (a reloaded page's:
        {"entry", "signature"} each), checked again as on arrival and reported; those that fail are left out."""
        if self.coordinator_id not in ("", coordinator_id):
            return  # another coordinator's: not this job's books
        self.coordinator_id = coordinator_id
        for r in kept:
            try:
                receipt = Receipt(r["entry"], r["signature"])
                if not isinstance(receipt.entry, dict) or not isinstance(receipt.signature, str):
                    raise WireError("a kept receipt is an entry and a signature")
                receipt.check()
            except (KeyError, TypeError, WireError) as e:
                self.port.report("notice", message=f"ignoring a kept receipt that is not one: {e}")
                continue
            await self._keep_receipt(receipt)

    def training_time(self, started: float) -> tuple[float, float]:
        """(the inner steps' wall time since `started`, less pauses: the node's speed as the GPU share makes it;
        the part of that spent computing, less the share's rests) for the round between_steps last saw. A port
        that never calls between_steps rests nowhere: both are the wall time."""
        wall = max(0.0, time.time() - started - self._paused_s)
        return wall, max(0.0, wall - self._duty_s)

    # -- lifetime ------------------------------------------------------------------------------------------

    async def run(self) -> Ended:
        delay = RECONNECT_MIN_S
        while True:
            self._welcomed = False
            try:
                await self._session()
            except Stopped:
                return self._end(Ended("stopped", "stopped"))
            except JobFinished as e:
                self.port.report("finished", reason=str(e))
                return self._end(Ended("finished", str(e)))
            except Refused as e:
                self.port.report("fatal", message=str(e))
                return self._end(Ended("refused", str(e)))
            except (Disconnected, asyncio.TimeoutError, *self.port.transient) as e:
                if self.stopped:
                    return self._end(Ended("stopped", "stopped"))
                if self._welcomed:  # that connection was good: an outage starts the backoff afresh
                    delay = RECONNECT_MIN_S
                self.phase = Phase.RECONNECTING
                self.port.report("state", state="reconnecting",
                                 message=f"{e or type(e).__name__}; reconnecting in {delay:.1f}s")
            finally:
                await self.swarm.close()
                await self.port.close()
            await self._sleep_unless_stopped(delay)
            if self.stopped:
                return self._end(Ended("stopped", "stopped"))
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _end(self, ended: Ended) -> Ended:
        self.phase = Phase.LEFT
        return ended

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopped and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, deadline - time.monotonic()))

    async def _session(self) -> None:
        self.phase = Phase.JOINING
        self._inbox, self._receivers, self._answer = asyncio.Queue(), {}, None
        # a new session: the coordinator (perhaps another job's, restarted) assigns afresh, and verdicts sent on the
        # old link are lost with it
        self._taken, self._awaiting, self._ahead, self._prefetch, self._closed_round = None, {}, None, None, -1
        if self.stopped:
            raise Stopped("stopped")
        self.port.report("state", state="connecting", path=None)
        await self.port.connect(self)
        welcome = await self._handshake()
        self._setup_job(welcome.job)
        self._welcomed = True
        max_payload = 4 * int(welcome.job["params"]) + 1024  # one model
        self._receivers = {"signaling": FrameReceiver(max_payload), "webrtc": FrameReceiver(max_payload)}
        self.port.report("state", state="opening data channel", round=welcome.round, job=welcome.job)
        self.path = await self._open_link()
        self.phase = Phase.IDLE
        self.port.report("state", state="connected", path=self.path, node_id=self.node_id)
        self._told_mode = "active"  # a new session starts active: a paused or finishing node says so again
        try:
            await self._tell_mode()
            await self._serve()
        except Stopped:
            await self._leave("stopped")
            raise

    async def _reply(self, what: str):
        try:
            return await self._next(HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Disconnected(f"no {what} from the coordinator within {HANDSHAKE_TIMEOUT_S:.0f}s") from None

    async def _handshake(self) -> Welcome:
        challenge = await self._reply("challenge")
        if not isinstance(challenge, Challenge):
            raise Disconnected(f"expected a challenge from the coordinator, got {challenge.TYPE}")
        self.coordinator_id = challenge.coordinator_id
        hello = Hello(self.node_id, self.port.kind, challenge.nonce, "0" * 128, agent=self.port.agent[:200],
                      blob_url=self.port.blob_url, name=self.port.name, team=self.port.team)
        hello = dataclasses.replace(hello, signature=await self.port.sign(signing_bytes("hello",
                                                                                     hello.signing_fields())))
        await self.port.send_signal(hello.encode())
        welcome = await self._reply("welcome")
        if isinstance(welcome, Error):  # a fatal Error was read as Disconnected by _next; this one was not fatal
            raise Disconnected(f"the coordinator did not admit this node: [{welcome.code}] {welcome.message}")
        if not isinstance(welcome, Welcome):
            raise Disconnected(f"expected welcome, got {welcome.TYPE}")
        return welcome

    def _setup_job(self, job: dict) -> None:
        try:
            cfg = GPTConfig.from_dict(job["config"])
            params = int(job["params"])
        except (KeyError, TypeError, ValueError) as e:
            raise Refused(f"the coordinator's job description cannot be read by this version: {e}") from None
        if num_parameters(cfg) != params:
            raise Refused("the coordinator's parameter count does not match this version's model layout")
        if cfg != self.cfg:
            self.model = self.model_hash = None
        self.port.prepare(job, cfg)
        self.job, self.cfg = job, cfg

    async def _open_link(self) -> str:
        if self.transport != "websocket":
            self._answer = asyncio.get_running_loop().create_future()
            offer = await self.port.create_offer()
            if offer is not None:
                await self.port.send_signal(Sdp(self.node_id, self.coordinator_id, "offer", offer).encode())
                try:
                    answer = await asyncio.wait_for(self._answer, DATA_CHANNEL_TIMEOUT_S)
                    if await self.port.accept_answer(answer.sdp, DATA_CHANNEL_TIMEOUT_S):
                        return "webrtc"
                except asyncio.TimeoutError:
                    pass
            if self.transport == "webrtc":
                raise Disconnected("the WebRTC data channel did not open")
            if offer is not None:
                self.port.report("notice", message=f"no WebRTC data channel within {DATA_CHANNEL_TIMEOUT_S:.0f}s; "
                                                   "using the WebSocket fallback")
        await self.port.use_fallback()
        await self.port.send_signal(PathSelect("websocket").encode())
        return "websocket"

    async def _leave(self, reason: str) -> None:
        try:
            await self.port.send(Bye(reason).encode())
            await asyncio.sleep(0.2)  # let the channel flush the goodbye before the links close
        except (Disconnected, *self.port.transient):
            pass

    async def _send(self, frame: str | bytes) -> None:
        try:
            await self.port.send(frame)
        except self.port.transient as e:
            raise Disconnected(f"sending failed: {e}") from e

    # -- messages ------------------------------------------------------------------------------------------

    async def _next(self, timeout: float | None = None):
        item = await (asyncio.wait_for(self._inbox.get(), timeout) if timeout else self._inbox.get())
        while item is _MODE_CHANGED:
            await self._tell_mode()
            item = await (asyncio.wait_for(self._inbox.get(), timeout) if timeout else self._inbox.get())
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Bye):
            raise JobFinished(item.reason or "the coordinator said goodbye")
        if isinstance(item, Error):
            if item.fatal:
                if item.code == "finished":
                    raise JobFinished(item.message)
                if item.code in REMOVED_CODES:
                    raise Refused(f"the coordinator refused this node: [{item.code}] {item.message}")
                before = "" if self._welcomed else "the coordinator cannot take this node now: "
                raise Disconnected(f"{before}[{item.code}] {item.message}")  # a join-rate limit, say: it passes
            if item.code != "no_peer":  # a peer we dialed left meanwhile: its link times out, nothing to do
                self.port.report("notice", message=f"coordinator: [{item.code}] {item.message}")
        elif isinstance(item, RoundClosed):
            self.port.report("round_closed", round=item.round, val_loss=item.val_loss, accepted=item.accepted,
                             rejected=item.rejected, balance=self.balance)
        elif isinstance(item, Receipt):
            await self._keep_receipt(item)
        return item

    async def _keep_receipt(self, receipt: Receipt) -> None:
        """Check a receipt as anyone could offline: about this node, well formed, signed by the coordinator."""
        try:
            entry = check_receipt(receipt.entry, self.node_id)
        except LedgerError as e:
            self.port.report("notice", message=f"ignoring a malformed receipt: {e}")
            return
        if not await self.port.verify(self.coordinator_id, receipt_bytes(entry), receipt.signature):
            self.port.report("notice", message="ignoring a receipt whose signature does not verify")
            return
        self.receipts.append(receipt.entry)
        self.balance = entry.balances.get(self.node_id, self.balance)
        amount = sum(leg.amount for leg in entry.postings if leg.account == self.node_id)
        stake = sum(leg.amount for leg in entry.postings if leg.account != self.node_id and self.node_id in leg.account)
        self.port.report("receipt", kind=entry.kind, round=entry.round, seq=entry.seq, amount=amount,
                         stake_change=stake, balance=self.balance, hash=entry.hash, verified=True,
                         entry=receipt.entry, signature=receipt.signature, coordinator=self.coordinator_id)

    # -- rounds --------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        pending: RoundOpen | None = None
        while True:
            self.phase = Phase.IDLE
            item = pending or await self._next()
            pending = None
            if isinstance(item, RoundOpen):
                if self._closed_round > item.round or self._sent_for(item):
                    continue  # closed already (a newer assignment is on its way), or its update awaits its verdict
                try:
                    await self._hold_while_paused(item.round)
                    self._taken = (item.round, item.model_hash)
                    pending = await self._round(item)
                except RoundDropped as e:
                    self.port.report("notice", message=str(e))
                if self.max_rounds and self.rounds_done + len(self._awaiting) >= self.max_rounds:
                    await self._verdicts()
                    await self._leave(f"completed {self.rounds_done} round(s)")
                    raise JobFinished(f"completed {self.rounds_done} round(s)")
                if self.mode == "finishing":
                    await self._verdicts()
                    self.stopped = True
                    raise Stopped("finished the round, as asked")  # _session says goodbye

    async def _round(self, assignment: RoundOpen) -> RoundOpen | None:
        """Train one assignment and upload it. Returns a newer RoundOpen that arrived meanwhile, if any."""
        signed = signing_bytes("model", {"round": assignment.round, "model_hash": assignment.model_hash})
        if not await self.port.verify(self.coordinator_id, signed, assignment.model_signature):
            self.port.report("notice", message=f"round {assignment.round + 1}: the model signature does not "
                                               "verify; skipping the round")
            return None
        cfg = assignment.config
        received = time.time()
        steps, batch = self.planner.plan(_rules_in_force(cfg), cfg, assignment.round)
        # shown as round N, the one whose commit completes N rounds (as the status and dashboard count them)
        self.port.report("round", round=assignment.round + 1, steps=steps, batch=batch, shard=assignment.shard,
                         plan=self.planner.note)
        await self.swarm.advise(assignment.peers, assignment.peer_urls)
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:  # the model fetched ahead, or not: never two fetches at once
            await asyncio.wait([prefetch])
        newer = await self._fetch_model(assignment)
        if self.model_hash != assignment.model_hash:
            return newer
        compute = wall = 0.0
        if self._trained is not None and self._trained[0] == assignment.round - 1:  # the round before, from its
            compute, wall = self._trained[2], received - self._trained[1]  # assignment to this one's
        await self._send(RoundStats(assignment.round, len(self.swarm.open_peers), self.swarm.bytes_from_peers,
                                    self.swarm.bytes_from_coordinator, self.swarm.bytes_to_peers, compute,
                                    wall).encode())
        work = await self._work(assignment, steps, batch)
        await self.port.before_training(self, work)
        self.phase = Phase.TRAINING
        self._fetch_ahead()  # (work holds this round's model: the node may hold the next one meanwhile)
        started = time.time()
        losses = await self.port.train(self, work)
        seconds, compute = self.training_time(started)
        self._trained = (assignment.round, received, compute)
        try:
            if not all(math.isfinite(x) for x in losses):  # a handful of floats, not tensor data
                raise compress.CodecError("the loss is not finite")
            payload = await self.port.encode(self, work)
        except compress.CodecError as e:
            self.skipped += 1
            self.rounds_done += 1
            self.port.report("notice", message=f"round {assignment.round + 1}: the update is not finite ({e}); "
                                               "it is not sent, and this node carries on with the next round")
            return newer
        overlapped = cfg.get("overlap") is True
        # awaited before it is sent: the verdict may come back while the last bytes are still being sent
        sent = self._awaiting[assignment.round] = Sent(work, losses, seconds, received, assignment.model_hash,
                                                       float(cfg["deadline_seconds"]), overlapped)
        header = await self._upload(assignment, work, payload, losses, seconds)
        self.port.report("uploaded", round=assignment.round, bytes=header.total_bytes, sha256=header.sha256,
                         model_hash=assignment.model_hash)  # the model it trained on, checked against this hash
        if overlapped:  # the next round is open already: train it now, and book this verdict when it comes
            self._plan_from(sent)
            return newer
        return await self._verdict(assignment, newer)

    def _sent_for(self, assignment: RoundOpen) -> bool:
        """Whether this node's update for this very assignment awaits its verdict: the coordinator opened the round
        again on the same model (after a failed settle), where that update still counts."""
        sent = self._awaiting.get(assignment.round)
        return sent is not None and sent.model_hash == assignment.model_hash

    def _heard_ahead(self, assignment: RoundOpen) -> None:
        """An assignment arrived. With overlapped rounds one for a round after the one in hand may come while this
        node trains: its model is then fetched meanwhile (NodePort.prefetches)."""
        if not self.port.prefetches or assignment.config.get("overlap") is not True:
            return
        if self._taken is not None and assignment.round <= self._taken[0]:
            return
        self._ahead = assignment
        if self.phase in (Phase.TRAINING, Phase.UPLOADING):
            self._fetch_ahead()

    def _fetch_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.model_hash == self.model_hash:
            return
        if self._prefetch is None or self._prefetch.done():
            self._prefetch = self.swarm.spawn(self._prefetch_model(ahead))

    async def _prefetch_model(self, assignment: RoundOpen) -> None:
        """The model of the round ahead, from blobs, while this node trains the round in hand, so that it starts that
        round at once. What cannot be had now is left to that round's own fetch."""
        signed = signing_bytes("model", {"round": assignment.round, "model_hash": assignment.model_hash})
        if not await self.port.verify(self.coordinator_id, signed, assignment.model_signature):
            return  # (the round itself says so, when it comes)
        try:
            await self._fetch_blobs(assignment)
        except (Disconnected, *self.port.transient) as e:
            self.port.report("notice", message=f"round {assignment.round + 1}: its model was not fetched ahead ({e}); "
                                               "it is fetched when the round starts")

    async def _fetch_model(self, assignment: RoundOpen) -> RoundOpen | None:
        """Ask for the round's model unless it is held. A newer RoundOpen that arrives meanwhile is returned."""
        newer: RoundOpen | None = None
        if self.model_hash == assignment.model_hash:
            return None
        self.phase = Phase.FETCHING
        if await self._fetch_blobs(assignment):
            return None
        await self._send(ModelRequest(assignment.round, assignment.model_hash).encode())
        while True:
            item = await self._next()
            if isinstance(item, tuple) and item[0].kind == "model":
                header, data = item
                if header.sha256 != assignment.model_hash:  # the receiver already checked data against it
                    raise Disconnected("the model payload does not match the signed hash")
                self.swarm.bytes_from_coordinator += len(data)
                self._hold_model(assignment, self.port.load_model(header.sha256, data), data)
                self.port.report("model", round=assignment.round + 1, source="link", bytes=len(data), chunks=0,
                                 hash=self.model_hash, from_peers=0, from_coordinator=len(data))
                return newer
            if isinstance(item, UpdateResult) and not item.accepted and item.round == assignment.round:
                self.port.report("notice", message=f"model request refused: {item.reason}")
                return newer
            if isinstance(item, RoundOpen):
                newer = item

    async def _fetch_blobs(self, assignment: RoundOpen) -> bool:
        """Hold the round's model from blobs: the delta from the model held, when there is one, else the snapshot.
        False when this node cannot fetch blobs, or a piece is missing or does not check out (then it asks for
        the model over its link)."""
        swarm = self.swarm
        before = swarm.bytes_from_peers, swarm.bytes_from_coordinator, swarm.bytes_from_peers_direct

        def sources() -> dict:
            return {"from_peers": swarm.bytes_from_peers - before[0],
                    "from_coordinator": swarm.bytes_from_coordinator - before[1],
                    "from_peers_direct": swarm.bytes_from_peers_direct - before[2]}

        if assignment.delta and self.model_hash is not None and self.port.applies_delta(self.model):
            if assignment.manifest:  # the snapshot's manifest meanwhile, so that newcomers can have it from here
                self._snapshot_manifest = self.swarm.spawn(self._fetch_snapshot_manifest(assignment))
            got = await self._blob(assignment, assignment.delta, "delta", self.model_hash)
            if got is not None:
                manifest, payload = got
                try:
                    applied = self.port.apply_delta(self.model, compress.parse_codec(manifest.codec), payload)
                except compress.CodecError as e:
                    applied = None
                    self.port.report("notice", message=f"round {assignment.round + 1}: the delta does not decode "
                                                       f"({e}); fetching the snapshot instead")
                if applied is not None and sha256_hex(applied[1]) == assignment.model_hash:
                    self._hold_model(assignment, applied[0], applied[1])
                    self.port.report("model", round=assignment.round + 1, source="delta", bytes=len(payload),
                                     chunks=len(manifest.chunks), hash=self.model_hash, **sources())
                    return True
                if applied is not None:
                    self.port.report("notice", message=f"round {assignment.round + 1}: the delta did not make the "
                                                       "signed model; fetching the snapshot instead")
        got = await self._blob(assignment, assignment.manifest, "snapshot", "") if assignment.manifest else None
        if got is None:
            return False
        manifest, data = got
        self._hold_model(assignment, self.port.load_model(assignment.model_hash, data), data, manifest)
        self.port.report("model", round=assignment.round + 1, source="blobs", bytes=len(data),
                         chunks=len(manifest.chunks), hash=self.model_hash, **sources())
        return True

    def _hold_model(self, assignment: RoundOpen, model: Any, data: bytes, manifest: Manifest | None = None) -> None:
        """The round's model is held: as the port keeps it, and its bytes, whose snapshot chunks peers may ask for
        (views into `data`, so that they cost no second copy). Without the snapshot's manifest at hand, it is
        fetched in the background."""
        self.model, self.model_hash = model, assignment.model_hash
        if manifest is not None:
            self.swarm.hold(assignment.model_hash, dict(zip(manifest.chunks, cut(data))))
        elif assignment.manifest:
            self.swarm.spawn(self._serve_snapshot(assignment, data))

    async def _fetch_snapshot_manifest(self, assignment: RoundOpen) -> Manifest | None:
        """The signed manifest of the round's snapshot, checked; None when it cannot be had or does not check out."""
        got = await self.swarm.fetch(assignment.model_hash, [assignment.manifest], self._seeded(assignment, True),
                                     self.port.fetch_blob)
        if got is None:
            return None
        try:
            manifest = Manifest.from_bytes(got[assignment.manifest], assignment.manifest)
            if (manifest.kind, manifest.result_hash) != ("snapshot", assignment.model_hash):
                raise ManifestError("it is not the manifest of the round's model")
            if not await self.port.verify(self.coordinator_id, manifest.signing_bytes(), manifest.signature):
                raise ManifestError("the manifest's signature is not the coordinator's")
        except ManifestError as e:
            self.port.report("notice", message=f"round {assignment.round + 1}: not serving the model to peers: {e}")
            return None
        return manifest

    async def _serve_snapshot(self, assignment: RoundOpen, data: bytes) -> None:
        """Hold the snapshot chunks of a model that came as a delta or over the link: its signed manifest names them,
        and they are slices of the model's bytes (whose hash the node checked), so nothing is hashed again."""
        task, self._snapshot_manifest = self._snapshot_manifest, None
        manifest = await (task if task is not None else self._fetch_snapshot_manifest(assignment))
        if (manifest is not None and (manifest.result_hash, manifest.size) == (assignment.model_hash, len(data))
                and self.model_hash == assignment.model_hash):  # (a task left from another round is no use)
            self.swarm.hold(assignment.model_hash, dict(zip(manifest.chunks, cut(data))))

    @staticmethod
    def _seeded(assignment: RoundOpen, manifest: bool = False):
        """Which of a manifest's chunks (or, for `manifest`, the manifest itself) this node fetches from the
        coordinator at once: its seed share (RoundOpen.seed_slot)."""
        if manifest:
            return lambda i: assignment.seed_slot == 0
        return lambda i: seeded(i, assignment.seed_slot, assignment.seed_slots)

    async def _blob(self, assignment: RoundOpen, name: str, kind: str, base: str) -> tuple[Manifest, bytes] | None:
        """The manifest `name` of the round's model (of `kind`, from model `base`) and its checked chunks, joined;
        None when it is not that, or cannot be had. Blobs come from peers first (shared/swarm.py)."""
        got = await self.swarm.fetch(assignment.model_hash, [name], self._seeded(assignment, True),
                                     self.port.fetch_blob)
        if got is None:
            return None
        try:
            manifest = Manifest.from_bytes(got[name], name)
            if (manifest.kind, manifest.base_hash, manifest.result_hash) != (kind, base, assignment.model_hash):
                return None  # a delta from another model than the one held: the snapshot serves
            if not await self.port.verify(self.coordinator_id, manifest.signing_bytes(), manifest.signature):
                raise ManifestError("the manifest's signature is not the coordinator's")
            chunks = await self.swarm.fetch(assignment.model_hash, list(manifest.chunks), self._seeded(assignment),
                                            self.port.fetch_blob)
            if chunks is None:
                return None
            return manifest, assemble(manifest, [chunks[c] for c in manifest.chunks], checked=True)
        except ManifestError as e:
            self.port.report("notice", message=f"round {assignment.round + 1}: the model's {kind} blobs do not check "
                                               f"out ({e}); getting the model another way")
            return None

    async def _work(self, assignment: RoundOpen, steps: int, batch: int) -> Work:
        cfg = assignment.config
        seq = int(cfg["seq_len"])
        if assignment.shard not in self.shards:
            self.shards[assignment.shard] = await self.port.fetch_shard(assignment.shard)
        shard = self.shards[assignment.shard]
        try:
            schedule = batch_starts(len(shard), steps, batch, seq, batch_seed(self.node_id, assignment.round))
            spec = compress.CodecSpec.from_dict(cfg.get("codec", {"name": "fp32"}))
        except (ScheduleError, compress.CodecError) as e:
            raise Refused(f"this node cannot run the job's round config: {e}") from None
        return Work(assignment.round, steps, batch, seq, float(cfg["lr"]), float(cfg.get("weight_decay", 0.0)),
                    schedule, shard, self.model, spec)

    async def _upload(self, assignment: RoundOpen, work: Work, payload: bytes, losses: list[float],
                      seconds: float) -> PayloadHeader:
        """The signed Update, then its payload, with nothing in between."""
        self.phase = Phase.UPLOADING
        self._transfer_id = (self._transfer_id + 1) % (1 << 32)
        header, chunks = payload_frames(self._transfer_id, "update", payload, {"round": assignment.round})
        update = Update(self.node_id, assignment.round, assignment.model_hash,
                        tokens_allowed(work.steps, work.batch, work.seq_len), work.steps, losses[0], losses[-1],
                        work.spec.to_dict(), int(self.job["params"]), header.transfer_id, header.sha256,
                        header.total_bytes, "0" * 128, seconds)
        signature = await self.port.sign(signing_bytes("update", update.signing_fields()))
        await self._send(dataclasses.replace(update, signature=signature).encode())
        await self._send(header.encode())
        for chunk in chunks:
            await self._send(chunk)
        return header

    async def _verdict(self, assignment: RoundOpen, newer: RoundOpen | None) -> RoundOpen | None:
        """Wait for the verdict on this round's update (booked by feed as it arrives); a newer RoundOpen that
        arrives meanwhile is returned."""
        self.phase = Phase.AWAITING_VERDICT
        deadline = time.time() + RESULT_TIMEOUT_S
        while assignment.round in self._awaiting and time.time() < deadline:
            try:
                item = await self._next(max(0.1, deadline - time.time()))
            except asyncio.TimeoutError:
                break
            if isinstance(item, RoundOpen):
                newer = item
        if assignment.round in self._awaiting:
            raise Disconnected("no verdict on the update")
        return newer

    async def _verdicts(self) -> None:
        """Before leaving: wait (a bounded time) for the verdicts on the updates sent and not yet judged."""
        deadline = time.time() + RESULT_TIMEOUT_S
        while self._awaiting and time.time() < deadline:
            try:
                await self._next(max(0.1, deadline - time.time()))
            except asyncio.TimeoutError:
                break

    def _book(self, result: UpdateResult) -> None:
        """The verdict on an update this node sent: counted, and reported."""
        sent = self._awaiting.pop(result.round)
        work, losses = sent.work, sent.losses
        if not sent.overlapped:  # (an overlapped round's speed was learnt when it was sent)
            self._plan_from(sent)
        self.rounds_done += 1
        self.accepted += int(result.accepted)
        self.rejected += int(not result.accepted)
        tokens = tokens_allowed(work.steps, work.batch, work.seq_len)
        self.port.report("update", round=result.round, accepted=result.accepted, reason=result.reason,
                         rule=result.rule, accepted_total=self.accepted, rejected_total=self.rejected,
                         loss_first=losses[0], loss_last=losses[-1], steps=work.steps,
                         tokens_per_s=tokens / max(sent.seconds, 1e-9))

    def _plan_from(self, sent: Sent) -> None:
        """The autonomy loop learns the round's speed and what it waited besides training, until now."""
        self.planner.finished(sent.work.steps, sent.seconds, sent.work.batch,
                              max(0.0, time.time() - sent.received - sent.seconds), sent.deadline_seconds)


def _rules_in_force(config: dict) -> dict | None:
    """The rules and governed parameters a round config carries, as RoundPlanner reads them; None without."""
    if isinstance(config.get("rules"), list) and isinstance(config.get("params"), dict):
        return {"rules": config["rules"], "params": config["params"]}
    return None
