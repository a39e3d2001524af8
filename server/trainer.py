"""The PyTorch trainer node: joins a coordinator, trains its assigned shard for H inner AdamW steps per round,
and uploads a signed pseudo-gradient over a WebRTC data channel (or the WebSocket fallback).

It reconnects when the coordinator goes away, and starts each round's inner optimizer afresh so that the coordinator
can re-execute any update. Never send an update computed on a model whose hash and coordinator signature were not
checked.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
import websockets
import websockets.exceptions  # named in run()'s except clause before any connection has loaded it

from server.net import rtc
from server.keys import NodeKey, SignatureError, verify
from server.net.link import DataChannelLink, FrameReceiver, Link, LinkClosed, WebSocketLink
from server.codecs import TorchErrorFeedback
from server.model import GPT, flat_parameters, load_flat_parameters
from server.training import byte_tensor, inner_steps
from shared import compress
from shared.batches import batch_seed, batch_starts, tokens_allowed
from shared.agent import RoundPlanner
from shared.identity import signing_bytes
from shared.rewards import LedgerError, check_receipt, receipt_bytes
from shared.model import GPTConfig, num_parameters
from shared.wire import (MAX_MESSAGE_BYTES, Bye, Challenge, Error, Hello, ModelRequest, PathSelect, Receipt,
                         RoundClosed, RoundOpen, Sdp, Update, UpdateResult, Welcome, WireError, decode_message)

log = logging.getLogger("swarmgrad.trainer")

DATA_CHANNEL_TIMEOUT_S = 15.0  # then fall back to the WebSocket path (transport "auto")
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
RESULT_TIMEOUT_S = 120.0


class FatalError(Exception):
    """The coordinator refused this node or the job cannot be trained here; retrying will not help."""


class Disconnected(Exception):
    """The coordinator went away; the trainer reconnects."""


class JobFinished(Exception):
    pass


@dataclass
class TrainerOptions:
    coordinator: str  # http://host:port
    device: str = "auto"
    max_rounds: int = 0  # 0 = until the job ends
    ice_hosts: list[str] = field(default_factory=list)
    transport: str = "auto"  # auto | webrtc | websocket
    key_file: Path | None = None
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FatalError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


class Progress:
    """One status line: rewritten in place on a terminal, printed once per round otherwise.

    Rounds are shown as users see them everywhere else (status, dashboard): round N is the one whose commit makes
    N rounds completed, i.e. the one trained on the model after N - 1 rounds (RoundOpen.round = N - 1).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif final:
            print(text, file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, options: TrainerOptions):
        self.options = options
        self.key = NodeKey.load_or_create(options.key_file) if options.key_file else NodeKey()
        self.device = resolve_device(options.device)
        parts = urlsplit(options.coordinator)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FatalError(f"--coordinator must be an http(s) URL like http://127.0.0.1:8000, got {options.coordinator!r}")
        self.http_base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.ws_url = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, "/ws", "", ""))
        self.progress = Progress(options.progress)
        self.model: GPT | None = None
        self.global_params: np.ndarray | None = None
        self.global_hash: str | None = None
        self.shards: dict[int, torch.Tensor] = {}
        self.rounds_done = 0
        self.accepted = 0
        self.last_val_loss: float | None = None
        self.receipts: list[dict] = []  # verified ledger entries about this node
        self.balance = 0  # micro-credits, from the newest verified receipt
        self.planner = RoundPlanner()  # the autonomy loop: H and batch from measured speed and the deadline
        self.error_feedback: TorchErrorFeedback | None = None  # what lossy codecs left out, sent next round

    # -- lifetime ------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Train until the job ends or --max-rounds is reached; reconnect on lost connections. Exit code."""
        delay = RECONNECT_MIN_S
        while True:
            self.welcomed = False
            try:
                await self._session()
                return 0
            except JobFinished as e:
                self.progress.show(f"leaving: {e}", final=True)
                return 0
            except FatalError as e:
                log.error("%s", e)
                return 2
            except (Disconnected, OSError, websockets.exceptions.WebSocketException, LinkClosed) as e:
                if self.welcomed:  # that connection was good: an outage starts the backoff afresh
                    delay = RECONNECT_MIN_S
                log.warning("connection to the coordinator lost (%s); reconnecting in %.1fs", e or type(e).__name__,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _setup_model(self, job: dict) -> None:
        cfg = GPTConfig.from_dict(job["config"])
        if self.model is not None and self.model.cfg == cfg:
            return
        if num_parameters(cfg) != job["params"]:
            raise FatalError("the coordinator's parameter count does not match this version's model layout")
        self.model = GPT(cfg).to(self.device)
        log.info("model %s: %d parameters on %s", job["model"], job["params"], self.device)

    async def _session(self) -> None:
        async with websockets.connect(self.ws_url, max_size=2 * MAX_MESSAGE_BYTES, open_timeout=10) as ws:
            self.ws = ws
            challenge = decode_message(await asyncio.wait_for(ws.recv(), 10))
            if not isinstance(challenge, Challenge):
                raise FatalError(f"expected a challenge from the coordinator, got {challenge.TYPE}")
            self.coordinator_id = challenge.coordinator_id
            hello = Hello(self.key.node_id, "trainer", challenge.nonce, "0" * 128, agent=f"torch {torch.__version__} {self.device}")
            hello = Hello(**{**hello.__dict__, "signature": self.key.sign(signing_bytes("hello", hello.signing_fields()))})
            await ws.send(hello.encode())
            welcome = decode_message(await asyncio.wait_for(ws.recv(), 10))
            if isinstance(welcome, Error):
                if welcome.code == "finished":
                    raise JobFinished(welcome.message)
                if welcome.code != "denied":  # a join-rate limit, say: it passes, so try again later
                    raise Disconnected(f"the coordinator cannot take this node now: [{welcome.code}] "
                                       f"{welcome.message}")
                raise FatalError(f"the coordinator refused this node: [{welcome.code}] {welcome.message}")
            if not isinstance(welcome, Welcome):
                raise FatalError(f"expected welcome, got {welcome.TYPE}")
            self._setup_model(welcome.job)
            self.welcomed = True
            max_payload = 4 * welcome.job["params"] + 1024
            self.inbox: asyncio.Queue = asyncio.Queue()
            self.answer: asyncio.Future = asyncio.get_running_loop().create_future()
            ws_receiver = FrameReceiver(max_payload)
            reader = asyncio.create_task(self._read_websocket(ws, ws_receiver))
            pc = None
            try:
                self.link, pc = await self._open_link(ws, max_payload)
                self.progress.show(f"joined {self.http_base} as {self.key.node_id[:12]}… over {self.link.path}",
                                   final=True)
                await self._serve()
            finally:
                reader.cancel()
                if pc is not None:
                    await pc.close()

    async def _read_websocket(self, ws, receiver: FrameReceiver) -> None:
        try:
            async for frame in ws:
                try:
                    item = receiver.feed(frame)
                except WireError as e:
                    self.inbox.put_nowait(Disconnected(f"bad frame from the coordinator: {e}"))
                    return
                if isinstance(item, Sdp):
                    if not self.answer.done():
                        self.answer.set_result(item)
                elif item is not None:
                    self.inbox.put_nowait(item)
        except websockets.exceptions.ConnectionClosed:
            pass
        self.inbox.put_nowait(Disconnected("signaling socket closed"))

    async def _open_link(self, ws, max_payload: int) -> tuple[Link, object]:
        if self.options.transport != "websocket":
            pc = rtc.new_peer_connection()
            channel = pc.createDataChannel("swarmgrad", ordered=True)
            opened = asyncio.Event()
            channel.on("open", opened.set)
            receiver = FrameReceiver(max_payload)

            def on_message(frame) -> None:
                try:
                    item = receiver.feed(frame)
                except WireError as e:
                    self.inbox.put_nowait(Disconnected(f"bad frame from the coordinator: {e}"))
                    return
                if item is not None:
                    self.inbox.put_nowait(item)

            channel.on("message", on_message)
            channel.on("close", lambda: self.inbox.put_nowait(Disconnected("data channel closed")))
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send(Sdp(self.key.node_id, self.coordinator_id, "offer", pc.localDescription.sdp).encode())
            try:
                answer = await asyncio.wait_for(self.answer, DATA_CHANNEL_TIMEOUT_S)
                from aiortc import RTCSessionDescription

                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
                await asyncio.wait_for(opened.wait(), DATA_CHANNEL_TIMEOUT_S)
                return DataChannelLink(channel), pc
            except asyncio.TimeoutError:
                await pc.close()
                if self.options.transport == "webrtc":
                    raise Disconnected("the WebRTC data channel did not open")
                log.warning("the WebRTC data channel did not open in %.0fs; using the WebSocket fallback",
                            DATA_CHANNEL_TIMEOUT_S)
        await ws.send(PathSelect("websocket").encode())
        return WebSocketLink(ws.send, ws.send, lambda: ws.state.name == "OPEN"), None

    # -- rounds --------------------------------------------------------------------------------------------

    async def _next(self):
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Bye):
            raise JobFinished(item.reason or "the coordinator said goodbye")
        if isinstance(item, Error):
            if item.fatal:
                if item.code in ("quarantined", "denied"):
                    raise FatalError(f"the coordinator removed this node: {item.message}")
                raise Disconnected(f"[{item.code}] {item.message}")
            log.warning("coordinator: [%s] %s", item.code, item.message)
        if isinstance(item, Receipt):
            self._keep_receipt(item)
        return item

    def _keep_receipt(self, receipt: Receipt) -> None:
        """Check a receipt offline: it is about this node, well formed, and signed by the coordinator."""
        try:
            entry = check_receipt(receipt.entry, self.key.node_id)
            verify(self.coordinator_id, receipt_bytes(entry), receipt.signature)
        except (LedgerError, SignatureError) as e:
            log.warning("ignoring a receipt that does not verify: %s", e)
            return
        self.receipts.append(receipt.entry)
        self.balance = entry.balances.get(self.key.node_id, self.balance)

    async def _serve(self) -> None:
        pending_round: RoundOpen | None = None
        while True:
            item = pending_round or await self._next()
            pending_round = None
            if isinstance(item, RoundClosed):
                self.last_val_loss = item.val_loss
                balance = "" if not self.receipts else f" | balance {self.balance / 1e6:.6f} credits"
                self.progress.show(f"round {item.round} closed: validation loss {item.val_loss:.4f}, "
                                   f"{item.accepted} update(s) accepted{balance}", final=True)
            elif isinstance(item, RoundOpen):
                pending_round = await self._train_round(item)
                if self.options.max_rounds and self.rounds_done >= self.options.max_rounds:
                    await self._leave(f"completed {self.rounds_done} round(s)")

    async def _leave(self, reason: str) -> None:
        try:
            await self.link.send_message(Bye(reason))
            await asyncio.sleep(0.2)  # let the data channel flush the goodbye
        except LinkClosed:
            pass
        raise JobFinished(reason)

    async def _train_round(self, assignment: RoundOpen) -> RoundOpen | None:
        """Train one assignment and upload it. Returns a newer RoundOpen that arrived meanwhile, if any."""
        try:
            verify(self.coordinator_id, signing_bytes("model", {"round": assignment.round,
                                                                "model_hash": assignment.model_hash}),
                   assignment.model_signature)
        except SignatureError:
            log.error("round %d: model signature does not verify; skipping the round", assignment.round + 1)
            return None
        newer: RoundOpen | None = None
        if self.global_hash != assignment.model_hash:
            await self.link.send_message(ModelRequest(assignment.round, assignment.model_hash))
            while True:
                item = await self._next()
                if isinstance(item, tuple) and item[0].kind == "model":
                    header, data = item
                    if header.sha256 != assignment.model_hash:
                        raise Disconnected("the model payload does not match the signed hash")
                    self.global_params = np.frombuffer(data, "<f4").astype(np.float32)
                    self.global_hash = header.sha256
                    break
                if isinstance(item, UpdateResult) and not item.accepted:
                    log.warning("model request refused: %s", item.reason)
                    return None
                if isinstance(item, RoundOpen):
                    newer = item
        cfg = dict(assignment.config)
        received = time.time()
        steps, batch = await self._plan(assignment, cfg)
        cfg["inner_steps"], cfg["batch_size"] = steps, batch
        shard = await self._shard(assignment.shard)
        load_flat_parameters(self.model, torch.from_numpy(self.global_params))
        started = time.time()
        loss_first, loss_last, tokens = await asyncio.to_thread(self._inner_steps, assignment, cfg, shard)
        seconds = time.time() - started
        local = flat_parameters(self.model).numpy()
        pseudo_gradient = self.global_params - local
        spec = compress.CodecSpec.from_dict(cfg.get("codec", {"name": "fp32"}))
        if self.error_feedback is None or self.error_feedback.residual.numel() != pseudo_gradient.size:
            self.error_feedback = TorchErrorFeedback(pseudo_gradient.size)
        payload = self.error_feedback.encode(spec, torch.from_numpy(pseudo_gradient))

        def signed_update(header) -> Update:
            u = Update(self.key.node_id, assignment.round, assignment.model_hash, tokens, steps,
                       loss_first, loss_last, spec.to_dict(), pseudo_gradient.size, header.transfer_id,
                       header.sha256, header.total_bytes, "0" * 128, seconds)
            return Update(**{**u.__dict__, "signature": self.key.sign(signing_bytes("update", u.signing_fields()))})

        await self.link.send_payload("update", payload, {"round": assignment.round}, announce=signed_update)
        deadline = time.time() + RESULT_TIMEOUT_S
        while time.time() < deadline:
            item = await asyncio.wait_for(self._next(), RESULT_TIMEOUT_S)
            if isinstance(item, UpdateResult) and item.round == assignment.round:
                self.planner.finished(steps, seconds, batch, max(0.0, time.time() - received - seconds),
                                      float(cfg["deadline_s"]))
                self.rounds_done += 1
                self.accepted += int(item.accepted)
                verdict = "accepted" if item.accepted else f"rejected [{item.rule}] {item.reason}"
                self.progress.show(f"round {assignment.round + 1}: update {verdict} | loss {loss_first:.3f} -> "
                                   f"{loss_last:.3f} | {tokens / max(seconds, 1e-9):,.0f} tok/s | "
                                   f"H={steps} | {self.accepted} accepted", final=True)
                return newer
            if isinstance(item, RoundOpen):
                newer = item
            elif isinstance(item, RoundClosed):
                self.last_val_loss = item.val_loss
        raise Disconnected("no verdict on the update")

    async def _plan(self, assignment: RoundOpen, cfg: dict) -> tuple[int, int]:
        """H and batch for this round from the autonomy loop, under the rules in force (they change by vote)."""
        try:
            governance = await asyncio.to_thread(self._get_json, "/api/governance")
        except (OSError, ValueError) as e:
            log.warning("cannot read the rules in force: %s", e)
            governance = None
        steps, batch = self.planner.plan(governance, cfg, assignment.round)
        if self.planner.note:
            log.info("round %d: %s", assignment.round + 1, self.planner.note)
        return steps, batch

    def _get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.http_base + path, timeout=30) as r:
            return json.load(r)

    def _inner_steps(self, assignment: RoundOpen, cfg: dict, shard: torch.Tensor) -> tuple[float, float, int]:
        """H AdamW steps from a fresh optimizer on the shared batch schedule: what the spot check re-executes."""
        steps, batch, seq = int(cfg["inner_steps"]), int(cfg["batch_size"]), int(cfg["seq_len"])
        schedule = batch_starts(shard.numel(), steps, batch, seq, batch_seed(self.key.node_id, assignment.round))
        started = time.time()

        def show(step: int, loss: float) -> None:
            rate = (step + 1) * batch * seq / max(time.time() - started, 1e-9)
            self.progress.show(f"round {assignment.round + 1} | step {step + 1}/{steps} | {rate:,.0f} tok/s | "
                               f"loss {loss:.3f} | {self.accepted} accepted")

        losses = inner_steps(self.model, shard, schedule, seq, float(cfg["lr"]), float(cfg.get("weight_decay", 0.0)),
                             on_step=show)
        return losses[0], losses[-1], tokens_allowed(steps, batch, seq)

    async def _shard(self, index: int) -> torch.Tensor:
        if index not in self.shards:
            url = f"{self.http_base}/api/shards/{index}"

            def fetch() -> bytes:
                with urllib.request.urlopen(url, timeout=30) as r:
                    return r.read()

            try:
                self.shards[index] = byte_tensor(await asyncio.to_thread(fetch))
            except OSError as e:
                raise Disconnected(f"cannot fetch shard {index}: {e}") from e
        return self.shards[index]


def configure_ice(options: TrainerOptions) -> None:
    hosts = options.ice_hosts
    if not hosts:
        host = urlsplit(options.coordinator).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1"):
            hosts = ["::1" if host == "::1" else "127.0.0.1"]  # a coordinator on loopback is reached on loopback
    if hosts:
        rtc.restrict_ice_hosts(hosts)
