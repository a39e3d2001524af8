"""The browser node, run by Pyodide: shared/node.py's protocol with the page's WebGPU doing the work.

JS lends the links, WebCrypto and the GPUDevice through `bridge`: browser/node_worker.js, the module Web Worker this
runs in, holds the signaling socket, the key and the GPUDevice, and reaches the page's data channels (browser/node.js)
by postMessage. This driver (BrowserPort) only connects them to the Node. Never put round logic here: it belongs to
shared/node.py.
Never touch tensor or payload bytes one element at a time here: bulk math runs in WGSL, bytes move as buffers.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from typing import Any

from kernels.delta_apply import DEVICE_DELTA_CODECS, DeviceDeltaApply
from kernels.device import Device, DeviceError
from kernels.device_browser import BrowserDevice
from kernels.sparseloco_codec import DeviceSparseLoCo
from kernels.trainer import DeviceTrainer
from shared import compress
from shared.batches import ADAMW_BETAS, ADAMW_EPS, batch_starts
from shared.model import GPTConfig
from shared.node import DELTA_STDLIB_MAX_BYTES, Node, NodePort, Work
from shared.swarm import Swarm
from shared.tokens import read_tokens

try:
    from pyodide.ffi import JsException, can_run_sync, run_sync, to_js
except ImportError:  # plain CPython: tests drive the node with a Python bridge, which takes Python values
    JsException = RuntimeError  # type: ignore[misc,assignment]

    def to_js(value: Any) -> Any:
        return value

    def can_run_sync() -> bool:
        return True  # for devices whose reads never suspend (kernels.device_wgpu): see run_sync

    def run_sync(awaitable: Any) -> Any:
        """The awaitable's result, driven here: only for one that never suspends (wgpu-py reads block)."""
        step = awaitable.__await__()
        try:
            step.send(None)
        except StopIteration as done:
            return done.value
        step.close()
        raise RuntimeError("this awaitable suspends: outside Pyodide only non-suspending device reads can run sync")


PROGRESS_INTERVAL_S = 0.5  # inner steps are submitted in groups that take about this long, then reported


def batches_at(shard: bytes | array, schedule: list, seq_len: int) -> list[tuple[bytes, bytes]]:
    """The (tokens, targets) of each step of a batch_starts schedule: B*T ids each, row-major, packed as the shard
    packs them (one byte each, or uint16 for a BPE job: shared.tokens.read_tokens)."""
    return [(b"".join(shard[s : s + seq_len] for s in starts), b"".join(shard[s + 1 : s + seq_len + 1] for s in starts))
            for starts in schedule]


def sample_batches(shard: bytes, steps: int, batch_size: int, seq_len: int, seed: int) -> list[tuple[bytes, bytes]]:
    """The batches a node draws with `seed` (shared.batches.batch_seed); raises ScheduleError."""
    return batches_at(shard, batch_starts(len(shard), steps, batch_size, seq_len, seed), seq_len)


def js_bytes(value: Any) -> bytes:
    """An ArrayBuffer or typed array from JS (a JsProxy) as Python bytes, in one copy."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.to_bytes()


class BrowserPort(NodePort):
    """The page's port: JS links and WebCrypto through `bridge`, the WGSL trainer on `device`."""

    kind = "browser"
    transient = (JsException,)

    def __init__(self, bridge: Any, device: Any, agent: str = ""):
        self.bridge, self.device, self.agent = bridge, device, agent
        self.cfg: GPTConfig | None = None
        self.trainer: DeviceTrainer | None = None  # built for the round's batch when first needed
        self.feedback: compress.ErrorFeedback | None = None  # what a lossy codec left out, sent next round
        self.device_feedback: DeviceSparseLoCo | None = None  # sparseloco's encoder, its residual on the GPU
        self.swarm: Swarm | None = None  # the node's peer links, set by BrowserNode
        self.delta_apply: DeviceDeltaApply | None = None  # made on the first delta the GPU applies

    # identity and links: the page's WebCrypto key, socket and data channel
    async def sign(self, data: bytes) -> str:
        return str(await self.bridge.sign(to_js(data)))

    async def verify(self, public_key: str, data: bytes, signature: str) -> bool:
        return bool(await self.bridge.verify(public_key, to_js(data), signature))

    async def connect(self, node: Node) -> None:
        await self.bridge.connectSignaling()

    async def send_signal(self, text: str) -> None:
        await self.bridge.sendSignal(text)

    async def create_offer(self) -> str:
        return str(await self.bridge.createOffer())

    async def accept_answer(self, sdp: str, timeout: float) -> bool:
        await self.bridge.acceptAnswer(sdp)
        opened = bool(await self.bridge.waitChannelOpen(int(timeout * 1000)))
        if opened:
            self.bridge.usePath("webrtc")
        return opened

    async def use_fallback(self) -> None:
        self.bridge.usePath("websocket")  # closes any half-open peer connection first

    async def send(self, frame: str | bytes) -> None:
        await self.bridge.send(frame if isinstance(frame, str) else to_js(frame))

    async def close(self) -> None:
        self.bridge.closeLinks()  # the peer links too

    # peer links (shared/swarm.py): browser/peers.js's data channels, through the bridge
    async def peer_offer(self, peer: str) -> str:
        return str(await self.bridge.peerOffer(peer))

    async def peer_answer(self, peer: str, offer: str) -> str:
        return str(await self.bridge.peerAnswer(peer, offer))

    async def peer_accept(self, peer: str, answer: str) -> None:
        await self.bridge.peerAccept(peer, answer)

    async def peer_send(self, peer: str, frame: str | bytes) -> None:
        await self.bridge.peerSend(peer, frame if isinstance(frame, str) else to_js(frame))

    async def peer_close(self, peer: str) -> None:
        self.bridge.peerClose(peer)
        self.report_peers()

    def report_peers(self) -> None:
        """How many peer links are open now, for the page."""
        if self.swarm is not None:
            self.report("peers", open=len(self.swarm.open_peers))

    # work: the WGSL trainer
    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        if cfg != self.cfg:
            self.cfg, self.trainer, self.feedback, self.device_feedback = cfg, None, None, None

    async def fetch_shard(self, index: int) -> bytes | array:
        """The shard's token ids (shared.tokens: bytes, or uint16 for a BPE job); batches_at slices them as they are."""
        return read_tokens(js_bytes(await self.bridge.fetchBytes(f"/api/shards/{index}")), self.cfg.vocab_size)

    async def fetch_blob(self, name: str) -> bytes | None:
        try:
            return js_bytes(await self.bridge.fetchBytes(f"/api/blobs/{name}"))
        except JsException:  # not served (any more): the node asks over its link instead
            return None

    def _trainer(self, batch: int, params: Any) -> DeviceTrainer:
        if self.trainer is None or self.trainer.max_batch_size < batch:
            self.trainer = DeviceTrainer(self.device, self.cfg, params, max_batch_size=batch)
        return self.trainer

    async def train(self, node: Node, work: Work) -> list[float]:
        """All inner steps, submitted in groups so the page hears of progress without a readback per step. After each
        group (and before the first) the node may rest (the GPU share) or hold (paused): node.between_steps. Each
        report gives the round's compute seconds so far and its wall seconds less pauses."""
        trainer = self._trainer(work.batch, work.model)
        trainer.load_params(work.model)
        trainer.reset_optimizer()  # every round from fresh AdamW moments, so that the coordinator can re-execute it
        batches = batches_at(work.shard, work.schedule, work.seq_len)
        losses: list[float] = []
        group, started, compute = 1, time.time(), 0.0
        await node.between_steps(work)  # Stopped, or RoundDropped after a pause; likewise after every group
        while len(losses) < len(batches):
            part = batches[len(losses) : len(losses) + group]
            group_started = time.time()
            losses += await trainer.train_steps(part, work.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                                weight_decay=work.weight_decay, seq_len=work.seq_len)
            elapsed = time.time() - group_started
            compute += elapsed
            await node.between_steps(work, elapsed)  # the GPU share's rest follows the group it is for
            wall, _ = node.training_time(started)
            rows = sum(len(tokens) for tokens, _ in batches[: len(losses)])
            self.report("steps", round=work.round, done=len(losses), total=len(batches),
                        losses=[x if math.isfinite(x) else None for x in losses[-len(part):]],
                        tokens_per_s=rows / max(compute, 1e-9), compute_s=compute, wall_s=wall)
            if elapsed < PROGRESS_INTERVAL_S:
                group *= 2
        return losses

    async def encode(self, node: Node, work: Work) -> bytes:
        """theta_global - theta_local read back in fp32, then encoded; a lossy codec goes through error feedback
        (so what it drops is sent in a later round), and fp32 flushes any residual an earlier codec left.
        sparseloco runs on the GPU from the trainer's buffers, its residual kept there: only the payload comes back."""
        if work.spec.name == "sparseloco":
            if self.device_feedback is None or self.device_feedback.spec != work.spec:
                await self._residual_to_cpu()
                self.device_feedback = DeviceSparseLoCo(self.device, work.spec, self.trainer.num_params,
                                                        self.trainer.kernels)
                if self.feedback is not None:  # what an earlier codec left out goes on with this one
                    self.device_feedback.load_residual(self.feedback)
                    self.feedback = None
            # CodecError when not finite; the residual stays
            return await self.device_feedback.encode_difference(self.trainer.global_params, self.trainer.params)
        await self._residual_to_cpu()
        values = array("f")
        values.frombytes(await self.trainer.pseudo_gradient_fp32())
        if work.spec.name == "fp32" and self.feedback is None:
            return compress.encode(work.spec, values)  # lossless: nothing is left over
        if self.feedback is None:
            self.feedback = compress.ErrorFeedback(len(values))
        payload = self.feedback.encode(work.spec, values)  # CodecError when not finite; the residual stays
        if work.spec.name == "fp32":
            self.feedback = None  # the residual went out in full
        return payload

    # the round's model from a delta: on the GPU for DEVICE_DELTA_CODECS at any size, else NodePort's stdlib path
    def _gpu_applies_deltas(self) -> bool:
        """Whether apply_delta can use the GPU: a real device, and a call stack that can wait for its readback
        (NodePort.apply_delta is synchronous; Pyodide's run_sync needs JS Promise integration, Chromium's JSPI)."""
        return isinstance(self.device, Device) and can_run_sync()

    def applies_delta(self, model: Any) -> bool:
        """Any size when the GPU can apply deltas (the codec is known only in apply_delta, which declines one the
        GPU cannot do above DELTA_STDLIB_MAX_BYTES), else NodePort's limit."""
        return isinstance(model, bytes) and (len(model) <= DELTA_STDLIB_MAX_BYTES or self._gpu_applies_deltas())

    def apply_delta(self, model: Any, codec: compress.CodecSpec, data: bytes) -> tuple[Any, bytes] | None:
        """fp32 and int8 on the GPU, bit for bit compress.apply_delta's bytes (kernels/apply_delta.wgsl); other codecs,
        and values that are not finite, on the CPU up to DELTA_STDLIB_MAX_BYTES; None above it (then the node
        fetches the snapshot)."""
        if isinstance(model, bytes) and codec.name in DEVICE_DELTA_CODECS and self._gpu_applies_deltas():
            if self.delta_apply is None:
                kernels = getattr(self.trainer, "kernels", None)  # the trainer's compiled pipelines, when it has some
                self.delta_apply = DeviceDeltaApply(self.device, kernels)
            try:
                new = run_sync(self.delta_apply.apply(model, codec, data))  # CodecError as compress.decode raises it
            except (DeviceError, JsException) as e:  # a lost device: the CPU path, or the snapshot, instead
                self.report("notice", message=f"the GPU could not apply the delta ({e}); trying without it")
                new = None
            if new is not None:
                return new, new
        return super().apply_delta(model, codec, data)

    async def _residual_to_cpu(self) -> None:
        """Move sparseloco's GPU residual into `feedback`, for a CPU codec to carry on with."""
        if self.device_feedback is not None:
            self.feedback = compress.ErrorFeedback(self.device_feedback.count)
            self.feedback.residual = await self.device_feedback.read_residual()
            self.device_feedback = None

    def report(self, event: str, **fields: Any) -> None:
        self.bridge.report(json.dumps({"event": event, **fields}, allow_nan=False, default=str))


class BrowserNode:
    """One browser tab as a training node, as browser/node_worker.js drives it. `bridge` is that worker's Bridge;
    `adapter` and `gpu_device` its WebGPU adapter and device. `transport` is "auto", "webrtc" or "websocket". `name` and
    `team` are what the page's user chose to be shown as (shared.wire.check_display_name), signed in the Hello."""

    def __init__(self, bridge: Any, node_id: str, adapter: Any, gpu_device: Any, agent: str = "",
                 transport: str = "auto", name: str = "", team: str = ""):
        self.port = BrowserPort(bridge, BrowserDevice(adapter, gpu_device), agent[:200])
        self.port.name, self.port.team = name, team
        self.node = Node(self.port, node_id, transport)
        self.port.swarm = self.node.swarm

    async def run(self) -> str:
        """Train until Stop, the job's end, or a refusal: "stopped", "finished: why" or "refused: why"."""
        return str(await self.node.run())

    def on_frame(self, source: str, data: Any) -> None:
        """One frame from the signaling WebSocket ("websocket") or the data channel ("webrtc")."""
        frame = data if isinstance(data, str) else js_bytes(data)
        self.node.feed("signaling" if source == "websocket" else source, frame)

    def on_link_closed(self, source: str, reason: str) -> None:
        self.node.lost(source, reason)

    def on_peer_open(self, peer: str) -> None:
        """The data channel to another node (browser/peers.js) opened."""
        self.node.peer_opened(peer)
        self.port.report_peers()

    def on_peer_frame(self, peer: str, data: Any) -> None:
        self.node.peer_frame(peer, data if isinstance(data, str) else js_bytes(data))

    def on_peer_closed(self, peer: str, reason: str) -> None:
        self.node.peer_lost(peer, reason)
        self.port.report_peers()

    def stop(self) -> None:
        """Leave cleanly at the next opportunity: a goodbye to the coordinator, then the links close."""
        self.node.stop()

    # the page's controls: shared/node.py's, as written once for every node
    def pause(self) -> None:
        self.node.pause()

    def resume(self) -> None:
        self.node.resume()

    def finish(self) -> None:
        self.node.finish()

    async def restore_receipts(self, coordinator_id: str, kept: str) -> None:
        """The receipts the page kept (browser/local_store.js, as JSON), verified again and reported as on arrival."""
        await self.node.restore_receipts(coordinator_id, json.loads(kept))

    def set_share(self, share: float) -> None:
        """The GPU share, 0.1 to 1 (the page's slider, in percent, over 100)."""
        self.node.set_share(float(share))
