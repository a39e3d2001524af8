"""A simulated worker: the real node (shared/node.py) over an in-process socket into the real signaling server,
with torch CPU doing the work and the simulator's clock and attacks at two named hooks; and the in-process peer
links between workers (PeerExchange), over which the node's own mesh code (shared/swarm.py) trades chunks.

`before_training` holds each worker until every worker holds the round's model, then lets them train one at a time
in the order they were started (so the coordinator sums their updates in one order, however the models travelled),
and `encode` is where an attacker replaces its honest pseudo-gradient. Never reach into the coordinator from here:
a worker sends and receives only the frames a real node would.
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


class PeerLinkClosed(ConnectionError):
    """A frame for a peer link that is not open (never opened, or closed by either end)."""


class PeerLink:
    """One in-process stand-in for a WebRTC data channel between two workers: `dialer` sent the offer."""

    def __init__(self, token: str, dialer: str, answerer: str) -> None:
        self.token, self.dialer, self.answerer = token, dialer, answerer
        self.answered = self.opened = self.closed = False

    def other(self, node_id: str) -> str:
        return self.answerer if node_id == self.dialer else self.dialer


class PeerExchange:
    """The peer links between simulated workers. The offer and the answer are tokens naming a PeerLink; they still
    travel as real Sdp frames through the real signaling relay (the node sends them), so the relay, its sender
    check and its "no_peer" answer are the real ones. A frame sent on an open link reaches the other node's
    peer_frame on the next turn of the event loop, in order; closing either end tells the other one."""

    def __init__(self) -> None:
        self.ports: dict[str, "SimPort"] = {}  # node id -> the port of its current session
        self.links: dict[str, PeerLink] = {}  # token -> a link that is being opened or is open
        self.bytes = 0  # every frame sent over any peer link
        self._tokens = 0

    def offer(self, port: "SimPort", peer: str) -> str:
        self._tokens += 1
        link = PeerLink(f"sim-peer-link:{self._tokens}", port.node_id, peer)
        self._replace(port, peer, link)
        return link.token

    def answer(self, port: "SimPort", peer: str, offer: str) -> str | None:
        link = self.links.get(offer)
        if link is None or (link.dialer, link.answerer) != (peer, port.node_id) or link.answered:
            return None  # an offer this exchange never made, or one for another node
        link.answered = True
        self._replace(port, peer, link)
        return link.token

    def accept(self, port: "SimPort", peer: str, answer: str) -> None:
        """The dialer applies the answer: the link opens at both ends (on the next turn of the loop, as a data
        channel's open event would)."""
        link = self.links.get(answer)
        if link is None or port.links.get(peer) is not link or not link.answered or link.opened:
            return
        link.opened = True
        asyncio.get_running_loop().call_soon(self._open, link)

    def _open(self, link: PeerLink) -> None:
        for node_id in (link.dialer, link.answerer):
            port = self.ports.get(node_id)
            if link.closed or port is None or port.links.get(link.other(node_id)) is not link:
                self.close(self.ports.get(node_id), link, "the other end went away while it opened")
                return
        for node_id in (link.dialer, link.answerer):
            self.ports[node_id].node.peer_opened(link.other(node_id))

    async def send(self, port: "SimPort", peer: str, frame: str | bytes) -> None:
        link = port.links.get(peer)
        if link is None or not link.opened or link.closed:
            raise PeerLinkClosed(f"no open link to peer {peer[:12]}")
        self.bytes += len(frame)
        asyncio.get_running_loop().call_soon(self._deliver, link, port.node_id, frame)
        await asyncio.sleep(0)  # a send yields, as a data channel's does

    def _deliver(self, link: PeerLink, src: str, frame: str | bytes) -> None:
        dst = self.ports.get(link.other(src))
        if not link.closed and dst is not None and dst.links.get(src) is link:
            dst.node.peer_frame(src, frame)

    def close(self, port: "SimPort | None", link: PeerLink, reason: str) -> None:
        """Close `link` at both ends; the other end's node hears of it when the link had opened."""
        if link.closed:
            return
        link.closed = True
        self.links.pop(link.token, None)
        for node_id in (link.dialer, link.answerer):
            end = self.ports.get(node_id)
            if end is None or end.links.get(link.other(node_id)) is not link:
                continue
            del end.links[link.other(node_id)]
            if link.opened and end is not port:
                end.node.peer_lost(link.other(node_id), reason)

    def _replace(self, port: "SimPort", peer: str, link: PeerLink) -> None:
        """A node keeps one link per peer, as a Python node keeps one peer connection: a new one closes the old."""
        old = port.links.get(peer)
        if old is not None and old is not link:
            self.close(port, old, "replaced by a newer link")
        port.links[peer] = link
        self.links[link.token] = link


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
        self.node: Node | None = None
        self.links: dict[str, PeerLink] = {}  # peer node id -> the link to it, opening or open

    @property
    def node_id(self) -> str:
        return self.key.node_id

    async def connect(self, node: Node) -> None:
        self.node = node
        self.sim.exchange.ports[self.node_id] = self
        self.socket = InProcessSocket(node, Client(f"sim-{self.index}", self.index))
        self._serving = asyncio.create_task(self.sim.signaling.endpoint(self.socket))

    async def send_signal(self, text: str) -> None:
        self.socket.push(text)

    async def send(self, frame: str | bytes) -> None:
        self.socket.push(frame)

    async def close(self) -> None:
        for link in list(self.links.values()):
            self.sim.exchange.close(self, link, "the peer left")
        if self.sim.exchange.ports.get(self.node_id) is self:
            del self.sim.exchange.ports[self.node_id]
        if self.socket is not None:
            self.socket.hang_up()
            self.sim.uplink_bytes += self.socket.bytes_up
            self.socket.bytes_up = 0

    # peer links: in-process (PeerExchange), the offer and answer relayed by the real signaling server
    async def peer_offer(self, peer: str) -> str | None:
        return self.sim.exchange.offer(self, peer)

    async def peer_answer(self, peer: str, offer: str) -> str | None:
        return self.sim.exchange.answer(self, peer, offer)

    async def peer_accept(self, peer: str, answer: str) -> None:
        self.sim.exchange.accept(self, peer, answer)

    async def peer_send(self, peer: str, frame: str | bytes) -> None:
        await self.sim.exchange.send(self, peer, frame)

    async def peer_close(self, peer: str) -> None:
        link = self.links.get(peer)
        if link is not None:
            self.sim.exchange.close(self, link, "closed by the peer")

    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        if self.error_feedback is None:
            self.error_feedback = TorchErrorFeedback(int(job["params"]))

    async def fetch_shard(self, index: int) -> torch.Tensor:
        return self.sim.shard(index)

    async def fetch_blob(self, name: str) -> bytes | None:
        return self.sim.coordinator.blobs.get(name)  # what GET /api/blobs/{name} serves

    def load_model(self, model_hash: str, data: bytes) -> np.ndarray:
        return self.sim.model_for(model_hash, data)

    def applies_delta(self, model: np.ndarray) -> bool:
        return True

    def apply_delta(self, model: np.ndarray, codec: CodecSpec, data: bytes) -> tuple[np.ndarray, bytes]:
        return self.sim.applied(model, codec, data)

    async def before_training(self, node: Node, work: Work) -> None:
        self.sim.ready(self, work.round)
        while not self.sim.may_train(self, work.round):
            if node.stopped:
                raise Stopped("stopped")
            await self.sim.changed()

    async def train(self, node: Node, work: Work) -> list[float]:
        """H inner AdamW steps, in the event loop: workers train one after another."""
        self.sim.progress_worker(self, work.round)
        load_flat_parameters(self.sim.model, torch.from_numpy(work.model.copy()))
        losses = inner_steps(self.sim.model, work.shard, work.schedule, work.seq_len, work.lr, work.weight_decay)
        self.sim.trained(self, work)
        return losses

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
        elif event == "model":
            self.sim.fetched(fields)
        self.events.append((event, fields))
        if self.socket is not None:  # count what went up so far, also for a worker still connected
            self.sim.uplink_bytes += self.socket.bytes_up
            self.socket.bytes_up = 0
        self.sim.notify()
