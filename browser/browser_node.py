"""The browser node's protocol and round logic, run by Pyodide: the same steps as server/trainer.py, on WebGPU.

JS (browser/node.js) owns the UI, the sockets, WebCrypto and the GPUDevice and lends them through `bridge`.
Never touch tensor or payload bytes one element at a time here: bulk math runs in WGSL, bytes move as buffers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from array import array
from typing import Any

from kernels.device_browser import BrowserDevice
from kernels.quant import QUANT_BLOCK_SIZE
from kernels.trainer import DeviceTrainer
from shared import compress
from shared.agent import RoundPlanner
from shared.batches import ADAMW_BETAS, ADAMW_EPS, ScheduleError, batch_seed, batch_starts
from shared.identity import signing_bytes
from shared.rewards import LedgerError, check_receipt, receipt_bytes
from shared.model import GPTConfig, num_parameters
from shared.wire import (Bye, Challenge, Error, FrameReceiver, Hello, ModelRequest, PathSelect, Receipt,
                         RoundClosed, RoundOpen, Sdp, Update, UpdateResult, Welcome, WireError, decode_message,
                         payload_frames)

try:
    from pyodide.ffi import JsException, to_js
except ImportError:  # plain CPython: the pure parts stay importable for tests; running a node needs Pyodide
    JsException = RuntimeError  # type: ignore[misc,assignment]

    def to_js(value: Any) -> Any:
        raise RuntimeError("browser_node talks to the page through Pyodide; it cannot run a node in CPython")


HANDSHAKE_TIMEOUT_S = 10.0
DATA_CHANNEL_TIMEOUT_S = 15.0  # then fall back to the WebSocket path, as the PyTorch trainer does
RESULT_TIMEOUT_S = 120.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0
PROGRESS_INTERVAL_S = 0.5  # inner steps are submitted in groups that take about this long, then reported


class FatalError(Exception):
    """The coordinator refused this node, or this job cannot be trained here; retrying will not help."""


class Disconnected(Exception):
    """A link to the coordinator went away; the node reconnects."""


class JobFinished(Exception):
    """The coordinator said goodbye (the job ended)."""


class Stopped(Exception):
    """The user pressed Stop."""


def sample_batches(shard: bytes, steps: int, batch_size: int, seq_len: int, seed: int) -> list[tuple[bytes, bytes]]:
    """The batches of shared.batches.batch_starts, each as (tokens, targets): B*T bytes, row-major."""
    try:
        schedule = batch_starts(len(shard), steps, batch_size, seq_len, seed)
    except ScheduleError as e:
        raise FatalError(str(e)) from None
    batches = []
    for starts in schedule:
        tokens = b"".join(shard[s : s + seq_len] for s in starts)
        targets = b"".join(shard[s + 1 : s + seq_len + 1] for s in starts)
        batches.append((tokens, targets))
    return batches


def js_bytes(value: Any) -> bytes:
    """An ArrayBuffer or typed array from JS (a JsProxy) as Python bytes, in one copy."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.to_bytes()


class BrowserNode:
    """One browser tab as a training node. `bridge` is browser/node.js's Bridge; `gpu` its adapter and device.

    `transport` is "auto" (WebRTC, falling back to the WebSocket), "webrtc" or "websocket".
    """

    def __init__(self, bridge: Any, node_id: str, adapter: Any, gpu_device: Any, agent: str = "",
                 transport: str = "auto"):
        if transport not in ("auto", "webrtc", "websocket"):
            raise ValueError(f"transport must be auto, webrtc or websocket, not {transport!r}")
        self.bridge = bridge
        self.node_id = node_id
        self.device = BrowserDevice(adapter, gpu_device)
        self.agent = agent[:200]
        self.transport = transport
        self.trainer: DeviceTrainer | None = None
        self.cfg: GPTConfig | None = None
        self.global_params: bytes | None = None
        self.global_hash: str | None = None
        self.shards: dict[int, bytes] = {}
        self.rounds_done = 0
        self.accepted = 0
        self.rejected = 0
        self.planner = RoundPlanner()  # the autonomy loop: H and batch fitted to the deadline from measured speed
        self.balance: int | None = None  # micro-credits, from the newest verified receipt
        self.stopped = False
        self._transfer_id = 0
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._answer: asyncio.Future | None = None
        self._receivers: dict[str, FrameReceiver] = {}

    # -- called by JS ----------------------------------------------------------------------------------------

    def on_frame(self, source: str, data: Any) -> None:
        """One frame from the signaling WebSocket or the data channel (a str, or an ArrayBuffer)."""
        frame = data if isinstance(data, str) else js_bytes(data)
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
            if self._answer is not None and not self._answer.done() and item.sdp_type == "answer":
                self._answer.set_result(item)
        elif item is not None:
            self._inbox.put_nowait(item)

    def on_link_closed(self, source: str, reason: str) -> None:
        self._inbox.put_nowait(Disconnected(f"{source} closed: {reason}"))

    def stop(self) -> None:
        """Leave cleanly at the next opportunity: a goodbye to the coordinator, then the links close."""
        self.stopped = True
        self._inbox.put_nowait(Stopped("stopped by the user"))

    # -- lifetime --------------------------------------------------------------------------------------------

    def report(self, event: str, **fields: Any) -> None:
        self.bridge.report(json.dumps({"event": event, **fields}, allow_nan=False, default=str))

    async def run(self) -> str:
        """Train until Stop, the job's end, or a refusal; reconnect with backoff on lost links. Why it ended."""
        delay = RECONNECT_MIN_S
        while True:
            self.welcomed = False
            try:
                await self._session()
                return "done"
            except Stopped:
                return "stopped"
            except JobFinished as e:
                self.report("finished", reason=str(e))
                return f"finished: {e}"
            except FatalError as e:
                self.report("fatal", message=str(e))
                return f"refused: {e}"
            except (Disconnected, JsException) as e:
                self.bridge.closeLinks()
                if self.stopped:
                    return "stopped"
                if self.welcomed:  # that connection was good: an outage starts the backoff afresh
                    delay = RECONNECT_MIN_S
                self.report("state", state="reconnecting", message=f"{e}; reconnecting in {delay:.1f}s")
                await self._sleep_unless_stopped(delay)
                if self.stopped:
                    return "stopped"
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while not self.stopped and time.time() < deadline:
            await asyncio.sleep(min(0.1, deadline - time.time()))

    async def _session(self) -> None:
        self._inbox = asyncio.Queue()
        self._receivers = {}
        self._answer = None
        self.report("state", state="connecting", path=None)
        await self.bridge.connectSignaling()
        challenge = await self._handshake_reply("challenge")
        if not isinstance(challenge, Challenge):
            raise FatalError(f"expected a challenge from the coordinator, got {challenge.TYPE}")
        self.coordinator_id = challenge.coordinator_id
        hello = Hello(self.node_id, "browser", challenge.nonce, "0" * 128, agent=self.agent)
        hello = dataclasses.replace(hello, signature=await self._sign(signing_bytes("hello", hello.signing_fields())))
        await self.bridge.sendSignal(hello.encode())
        welcome = await self._handshake_reply("welcome")
        if isinstance(welcome, Error):
            if welcome.code == "finished":
                raise JobFinished(welcome.message)
            if welcome.code != "denied":  # a join-rate limit, say: it passes, so try again later
                raise Disconnected(f"the coordinator cannot take this node now: [{welcome.code}] {welcome.message}")
            raise FatalError(f"the coordinator refused this node: [{welcome.code}] {welcome.message}")
        if not isinstance(welcome, Welcome):
            raise FatalError(f"expected welcome, got {welcome.TYPE}")
        self._setup_job(welcome.job)
        self.welcomed = True
        max_payload = 4 * welcome.job["params"] + 1024
        self._receivers = {"websocket": FrameReceiver(max_payload), "webrtc": FrameReceiver(max_payload)}
        self.report("state", state="opening data channel", round=welcome.round, job=welcome.job)
        path = await self._open_link()
        self.report("state", state="connected", path=path, node_id=self.node_id)
        try:
            await self._serve()
        except Stopped:
            await self._leave("stopped by the user")
            raise

    async def _handshake_reply(self, what: str):
        try:
            return await self._next(HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Disconnected(f"no {what} from the coordinator within {HANDSHAKE_TIMEOUT_S:.0f}s") from None

    def _setup_job(self, job: dict) -> None:
        cfg = GPTConfig.from_dict(job["config"])
        if num_parameters(cfg) != job["params"]:
            raise FatalError("the coordinator's parameter count does not match this page's model layout; reload")
        if cfg != self.cfg:
            self.cfg, self.trainer = cfg, None
            self.global_params = self.global_hash = None

    async def _open_link(self) -> str:
        if self.transport != "websocket":
            self._answer = asyncio.get_running_loop().create_future()
            offer = await self.bridge.createOffer()
            await self.bridge.sendSignal(Sdp(self.node_id, self.coordinator_id, "offer", offer).encode())
            try:
                answer = await asyncio.wait_for(self._answer, DATA_CHANNEL_TIMEOUT_S)
                await self.bridge.acceptAnswer(answer.sdp)
                if await self.bridge.waitChannelOpen(int(DATA_CHANNEL_TIMEOUT_S * 1000)):
                    self.bridge.usePath("webrtc")
                    return "webrtc"
            except asyncio.TimeoutError:
                pass
            if self.transport == "webrtc":
                raise Disconnected("the WebRTC data channel did not open")
            self.report("notice", message=f"no WebRTC data channel within {DATA_CHANNEL_TIMEOUT_S:.0f}s; "
                                          "using the WebSocket fallback")
        self.bridge.usePath("websocket")  # closes any half-open peer connection first
        await self.bridge.sendSignal(PathSelect("websocket").encode())
        return "websocket"

    # -- messages --------------------------------------------------------------------------------------------

    async def _next(self, timeout: float | None = None):
        item = await (asyncio.wait_for(self._inbox.get(), timeout) if timeout else self._inbox.get())
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Bye):
            raise JobFinished(item.reason or "the coordinator said goodbye")
        if isinstance(item, Error):
            if item.fatal:
                raise Disconnected(f"[{item.code}] {item.message}")
            self.report("notice", message=f"coordinator: [{item.code}] {item.message}")
        if isinstance(item, RoundClosed):
            self.report("round_closed", round=item.round, val_loss=item.val_loss, accepted=item.accepted,
                        rejected=item.rejected)
        if isinstance(item, Receipt):
            await self._keep_receipt(item)
        return item

    async def _keep_receipt(self, receipt: Receipt) -> None:
        """Check a receipt as anyone could offline: about this node, well formed, signed by the coordinator."""
        try:
            entry = check_receipt(receipt.entry, self.node_id)
        except LedgerError as e:
            self.report("notice", message=f"ignoring a malformed receipt: {e}")
            return
        if not await self.bridge.verify(self.coordinator_id, to_js(receipt_bytes(entry)), receipt.signature):
            self.report("notice", message="ignoring a receipt whose signature does not verify")
            return
        self.balance = entry.balances.get(self.node_id, self.balance)
        amount = sum(leg.amount for leg in entry.postings if leg.account == self.node_id)
        stake = sum(leg.amount for leg in entry.postings if leg.account != self.node_id and self.node_id in leg.account)
        self.report("receipt", kind=entry.kind, round=entry.round, seq=entry.seq, amount=amount, stake_change=stake,
                    balance=self.balance, hash=entry.hash, verified=True)

    async def _governance(self) -> dict | None:
        try:
            return json.loads(js_bytes(await self.bridge.fetchBytes("/api/governance")))
        except (JsException, ValueError) as e:
            self.report("notice", message=f"cannot read the rules in force ({e}); running assignments as given")
            return None

    async def _send(self, text: str) -> None:
        try:
            await self.bridge.send(text)
        except JsException as e:
            raise Disconnected(f"sending failed: {e}") from e

    async def _sign(self, data: bytes) -> str:
        return str(await self.bridge.sign(to_js(data)))

    async def _leave(self, reason: str) -> None:
        try:
            await self._send(Bye(reason).encode())
            await asyncio.sleep(0.2)  # let the channel flush the goodbye before JS closes it
        except Disconnected:
            pass

    # -- rounds ----------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        pending: RoundOpen | None = None
        while True:
            item = pending or await self._next()
            pending = None
            if isinstance(item, RoundOpen):
                pending = await self._train_round(item)

    async def _train_round(self, assignment: RoundOpen) -> RoundOpen | None:
        """Train one assignment and upload it. Returns a newer RoundOpen that arrived meanwhile, if any."""
        signed = signing_bytes("model", {"round": assignment.round, "model_hash": assignment.model_hash})
        if not await self.bridge.verify(self.coordinator_id, to_js(signed), assignment.model_signature):
            self.report("notice", message=f"round {assignment.round}: the model signature does not verify; "
                                          "skipping the round")
            return None
        cfg = assignment.config
        received = time.time()
        steps, batch = self.planner.plan(await self._governance(), cfg, assignment.round)
        seq = int(cfg["seq_len"])
        # shown as round N, the one whose commit completes N rounds (as the status and dashboard count them)
        self.report("round", round=assignment.round + 1, steps=steps, shard=assignment.shard, plan=self.planner.note)
        newer: RoundOpen | None = None
        if self.global_hash != assignment.model_hash:
            await self._send(ModelRequest(assignment.round, assignment.model_hash).encode())
            while True:
                item = await self._next()
                if isinstance(item, tuple) and item[0].kind == "model":
                    header, data = item
                    if header.sha256 != assignment.model_hash:  # the assembler already checked data against it
                        raise Disconnected("the model payload does not match the signed hash")
                    self.global_params, self.global_hash = data, header.sha256
                    break
                if isinstance(item, UpdateResult) and not item.accepted:
                    self.report("notice", message=f"model request refused: {item.reason}")
                    return None
                if isinstance(item, RoundOpen):
                    newer = item
        shard = await self._shard(assignment.shard)
        trainer = self._trainer(batch)
        trainer.load_params(self.global_params)
        trainer.reset_optimizer()  # every round from fresh AdamW moments, so that the coordinator can re-execute it
        batches = sample_batches(shard, steps, batch, seq, batch_seed(self.node_id, assignment.round))
        started = time.time()
        losses = await self._inner_steps(trainer, assignment.round, batches, float(cfg["lr"]),
                                         float(cfg.get("weight_decay", 0.0)), seq)
        seconds = time.time() - started
        tokens = steps * batch * seq
        if not all(math.isfinite(x) for x in losses):  # a handful of floats, not tensor data
            self.report("notice", message=f"round {assignment.round}: the loss diverged; skipping the update")
            return newer
        spec = compress.CodecSpec.from_dict(cfg.get("codec", {"name": "fp32"}))
        payload = await self._encode(trainer, spec)
        self._transfer_id = (self._transfer_id + 1) % (1 << 32)
        header, chunks = payload_frames(self._transfer_id, "update", payload, {"round": assignment.round})
        update = Update(self.node_id, assignment.round, assignment.model_hash, tokens, steps, losses[0], losses[-1],
                        spec.to_dict(), trainer.num_params, header.transfer_id, header.sha256, header.total_bytes,
                        "0" * 128, seconds)
        signature = await self._sign(signing_bytes("update", update.signing_fields()))
        update = dataclasses.replace(update, signature=signature)
        # the signed Update, then its payload, with nothing in between (as server/net/link.py's send_payload)
        await self._send(update.encode())
        await self._send(header.encode())
        for chunk in chunks:
            try:
                await self.bridge.send(to_js(chunk))
            except JsException as e:
                raise Disconnected(f"sending the update failed: {e}") from e
        self.report("uploaded", round=assignment.round, bytes=header.total_bytes)
        deadline = time.time() + RESULT_TIMEOUT_S
        while time.time() < deadline:
            try:
                item = await self._next(max(0.1, deadline - time.time()))
            except asyncio.TimeoutError:
                break
            if isinstance(item, UpdateResult) and item.round == assignment.round:
                self.planner.finished(steps, seconds, batch, max(0.0, time.time() - received - seconds),
                                      float(cfg["deadline_s"]))
                self.rounds_done += 1
                self.accepted += int(item.accepted)
                self.rejected += int(not item.accepted)
                self.report("update", round=assignment.round, accepted=item.accepted, reason=item.reason,
                            rule=item.rule, accepted_total=self.accepted, rejected_total=self.rejected,
                            loss_first=losses[0], loss_last=losses[-1], tokens_per_s=tokens / max(seconds, 1e-9))
                return newer
            if isinstance(item, RoundOpen):
                newer = item
        raise Disconnected("no verdict on the update")

    def _trainer(self, batch: int) -> DeviceTrainer:
        if self.trainer is None or self.trainer.max_batch_size < batch:
            self.trainer = DeviceTrainer(self.device, self.cfg, self.global_params, max_batch_size=batch)
        return self.trainer

    async def _inner_steps(self, trainer: DeviceTrainer, round_: int, batches: list, lr: float,
                           weight_decay: float, seq: int) -> list[float]:
        """All inner steps, submitted in groups so the page hears of progress without a readback per step."""
        losses: list[float] = []
        group, started = 1, time.time()
        while len(losses) < len(batches):
            if self.stopped:
                raise Stopped("stopped by the user")
            part = batches[len(losses) : len(losses) + group]
            group_started = time.time()
            losses += await trainer.train_steps(part, lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                                weight_decay=weight_decay, seq_len=seq)
            elapsed = time.time() - group_started
            rows = sum(len(tokens) for tokens, _ in batches[: len(losses)])
            self.report("steps", round=round_, done=len(losses), total=len(batches),
                        losses=[x if math.isfinite(x) else None for x in losses[-len(part):]],
                        tokens_per_s=rows / max(time.time() - started, 1e-9))
            if elapsed < PROGRESS_INTERVAL_S:
                group *= 2
        return losses

    async def _encode(self, trainer: DeviceTrainer, spec: compress.CodecSpec) -> bytes:
        if spec.name == "int8" and compress.int8_block(spec) == QUANT_BLOCK_SIZE:
            scales, codes = await trainer.pseudo_gradient_int8()  # quantised on the GPU; raw: scales, then codes
            return compress.pack(spec, scales.tobytes() + codes)  # deflated here, when the job asks for it
        values = array("f")
        values.frombytes(await trainer.pseudo_gradient_fp32())
        return compress.encode(spec, values)

    async def _shard(self, index: int) -> bytes:
        if index not in self.shards:
            try:
                self.shards[index] = js_bytes(await self.bridge.fetchBytes(f"/api/shards/{index}"))
            except JsException as e:
                raise Disconnected(f"cannot fetch shard {index}: {e}") from e
        return self.shards[index]
