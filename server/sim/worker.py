"""A simulated worker: the real node (shared/node.py) over an in-process socket into the real signaling server,
with torch CPU doing the work and the simulator's clock and attacks at two named hooks.

`before_training` holds each worker until the simulator opens the round for everyone, and `encode` is where an
attacker replaces its honest pseudo-gradient. Never reach into the coordinator from here: a worker sends and
receives only the frames a real node would.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import namedtuple
from typing import TYPE_CHECKING

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server.codecs import TorchErrorFeedback
from server.keys import NodeKey
from server.model import flat_parameters, load_flat_parameters
from server.net.client import KeyedPort
from server.training import inner_steps
from shared.compress import CodecSpec
from shared.model import GPTConfig
from shared.node import Disconnected, Node, Stopped, Work

if TYPE_CHECKING:
    from server.sim import Simulation

Client = namedtuple("Client", "host port")


def worker_key(seed: int, index: int) -> NodeKey:
    """Keys from the seed, so that two runs with one seed have the same node ids and so the same batches."""
    secret = hashlib.sha256(f"swarmgrad-sim:{seed}:{index}".encode()).digest()
    return NodeKey(Ed25519PrivateKey.from_private_bytes(secret))


class InProcessSocket:
    """The coordinator's end of a simulated node's signaling socket: the few starlette WebSocket methods that
    server/net/signaling.py uses, over a queue, carrying the real wire frames byte for byte."""

    def __init__(self, node: Node, client: Client) -> None:
        self.node, self.client = node, client
        self.application_state = WebSocketState.CONNECTING
        self._frames: asyncio.Queue = asyncio.Queue()
        self.bytes_up = 0

    async def accept(self) -> None:
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> dict:
        return await self._frames.get()

    async def send_text(self, text: str) -> None:
        self._to_node(text)

    async def send_bytes(self, data: bytes) -> None:
        self._to_node(data)

    def _to_node(self, frame: str | bytes) -> None:
        if self.application_state != WebSocketState.CONNECTED:
            raise WebSocketDisconnect(1006)
        self.node.feed("signaling", frame)

    async def close(self, code: int = 1000) -> None:
        self.hang_up(code)
        self.node.lost("signaling socket", f"closed by the coordinator ({code})")

    def hang_up(self, code: int = 1000) -> None:
        if self.application_state != WebSocketState.DISCONNECTED:
            self.application_state = WebSocketState.DISCONNECTED
            self._frames.put_nowait({"type": "websocket.disconnect", "code": code})

    def push(self, frame: str | bytes) -> None:
        """A frame from the node."""
        if self.application_state != WebSocketState.CONNECTED:
            raise Disconnected("the in-process socket is closed")
        self.bytes_up += len(frame)
        key = "text" if isinstance(frame, str) else "bytes"
        self._frames.put_nowait({"type": "websocket.receive", key: frame})


class SimPort(KeyedPort):
    """One simulated worker's port. Its parameters and shards are shared with every other worker (one copy per
    model hash): a hundred workers of a larger model would not fit otherwise."""

    kind = "trainer"
    agent = "simulated"

    def __init__(self, sim: "Simulation", index: int, key: NodeKey, byzantine: bool) -> None:
        super().__init__(key)
        self.sim, self.index, self.byzantine = sim, index, byzantine
        self.socket: InProcessSocket | None = None
        self._serving: asyncio.Task | None = None
        self.error_feedback: TorchErrorFeedback | None = None
        self.assigned: int | None = None  # the newest round this worker was assigned
        self.results: dict[int, dict] = {}  # round -> the "update" report (its verdict)
        self.receipts = 0
        self.events: list[tuple[str, dict]] = []

    @property
    def node_id(self) -> str:
        return self.key.node_id

    async def connect(self, node: Node) -> None:
        self.socket = InProcessSocket(node, Client(f"sim-{self.index}", self.index))
        self._serving = asyncio.create_task(self.sim.signaling.endpoint(self.socket))

    async def send_signal(self, text: str) -> None:
        self.socket.push(text)

    async def send(self, frame: str | bytes) -> None:
        self.socket.push(frame)

    async def close(self) -> None:
        if self.socket is not None:
            self.socket.hang_up()
            self.sim.uplink_bytes += self.socket.bytes_up
            self.socket.bytes_up = 0

    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        if self.error_feedback is None:
            self.error_feedback = TorchErrorFeedback(int(job["params"]))

    async def fetch_shard(self, index: int) -> torch.Tensor:
        return self.sim.shard(index)

    async def fetch_blob(self, name: str) -> bytes | None:
        return self.sim.coordinator.blobs.get(name)  # what GET /api/blobs/{name} serves

    def load_model(self, model_hash: str, data: bytes) -> np.ndarray:
        return self.sim.model_for(model_hash, data)

    def apply_delta(self, model: np.ndarray, codec: CodecSpec, data: bytes) -> tuple[np.ndarray, bytes]:
        return self.sim.applied(model, codec, data)

    async def before_training(self, node: Node, work: Work) -> None:
        while self.sim.released < work.round:
            if node.stopped:
                raise Stopped("stopped")
            await self.sim.changed()

    async def train(self, node: Node, work: Work) -> list[float]:
        """H inner AdamW steps, in the event loop: workers train one after another."""
        self.sim.progress_worker(work.round)
        load_flat_parameters(self.sim.model, torch.from_numpy(work.model.copy()))
        return inner_steps(self.sim.model, work.shard, work.schedule, work.seq_len, work.lr, work.weight_decay)

    async def encode(self, node: Node, work: Work) -> bytes:
        """The attack hook: an attacker sends what the simulator forges from every worker's honest update."""
        values = torch.from_numpy(work.model) - flat_parameters(self.sim.model)
        values = await self.sim.attack(self, work.round, values)
        return self.error_feedback.encode(work.spec, values)

    def report(self, event: str, **fields) -> None:
        if event == "round":
            self.assigned = fields["round"] - 1
        elif event == "update":
            self.results[fields["round"]] = fields
        elif event == "receipt":
            self.receipts += 1
        elif event == "uploaded":
            self.sim.uploads.append({"node_id": self.node_id, **fields})
        self.events.append((event, fields))
        if self.socket is not None:  # count what went up so far, also for a worker still connected
            self.sim.uplink_bytes += self.socket.bytes_up
            self.socket.bytes_up = 0
        self.sim.notify()
