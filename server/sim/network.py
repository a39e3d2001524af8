"""A discrete-event model of the data plane at scale: how each round's model reaches N nodes over their links, by
the star or the mesh, on a virtual clock. The tracker's own advice (server/coordinator/tracker.py advise, and
advise_joiner for a node that joins an open round) says who links to whom and who seeds what, and the node's own
functions (shared/swarm.py seeded, rarest_first, choose_holder, fallback_due) and limits (PEER_WAIT_S,
PEER_REQUESTS, PEER_REQUEST_TIMEOUT_S, COORDINATOR_REQUESTS, ...) make each choice. Nothing trains and no byte
exists: a blob is a name and a size, a transfer is a flow that shares its sender's uplink and its receiver's
downlink.

It answers what `python -m server simulate` cannot at 1,000 nodes: the data plane's wall time, the coordinator's
egress and each node's utilisation. Never decide differently from the node: where shared/swarm.py, shared/node.py or
the tracker has a function, call it; what this model must restate of Swarm.fetch's loop (Fetch.step) follows that
loop line by line.

The model, and what it leaves out:
- Links: each node has an uplink, a downlink and a one-way latency to the Internet's core, drawn from MIX (a
  path's latency is the sum of its two ends'). The coordinator has COORDINATOR_MBIT each way.
- Bandwidth: a flow runs at the smaller of its sender's uplink and its receiver's downlink, each split equally among
  that link's flows. Capacity one flow cannot use is not handed to the others (max-min fairness would; TCP roughly
  does), so where the two ends are mismatched, transfers take a little longer than they would. No loss, no slow
  start, no congestion inside the network: only the edges are bottlenecks.
- Messages (RoundOpen, Have, Want, Missing, the relayed offer and answer) take a path's latency and no bandwidth.
  A new peer link opens after the relayed offer and answer and LINK_HANDSHAKE_RTTS direct round trips (ICE, DTLS,
  SCTP); links between nodes that stay are kept from round to round, as nodes keep them. A link that one end drops
  closes at both ends at once.
- A fetch (Swarm.fetch): its seed share from the coordinator at once, the rest from peers; what no peer offers from
  the coordinator once fallback_due (no blob from a peer and no new offer for PEER_WAIT_S). A request a peer has not
  answered in PEER_REQUEST_TIMEOUT_S drops the link to it (so no late blob arrives; it is re-dialed when the
  tracker advises it again); each blob is served to a peer once.
- A round: RoundOpen reaches every node; a node that holds the last model fetches the delta's manifest and chunks
  if its port applies deltas (NodePort.applies_delta, asked first), else, as any other, the snapshot's
  (Node._fetch_blobs); a node that applied a delta then fetches the snapshot's manifest in the background, to serve
  its chunks (Node._serve_snapshot). Then its data shard from the coordinator (SHARD_BYTES, a new shard each round),
  its H inner steps (compute: H x its class's step time), and its update up to the coordinator. The round closes
  when the last update is in; the coordinator's aggregation takes no time here.
- Churn: nodes leave as a round opens; the newcomers join the open round right after (the coordinator's rounds
  follow each other at once, so a node joins an open round): advise_joiner gives each its links and a seed slot.
- Not modelled: applying a delta (CPU time); by default every node's port applies deltas, as the trainer's does,
  whereas a browser's (the standard-library NodePort.applies_delta) does not for models above shared/node.py's
  DELTA_STDLIB_MAX_BYTES, `base` among them, and fetches the snapshot instead: `browser_port` asks it. Also
  left out: ICE failures and TURN relays, a peer that lies (every blob checks out), a node that joins or leaves
  mid-round other than as above, the control plane's bandwidth (CONTROL_BYTES_PER_NODE is counted as egress, not
  timed).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.coordinator.tracker import DEFAULT_PEERS, advise, advise_joiner
from shared.manifest import BLOB_CHUNK_BYTES, Manifest
from shared.model import MODEL_SIZES, num_parameters
from shared.node import NodePort
from shared.swarm import (COORDINATOR_REQUESTS, HAVE_FLUSH_S, MAX_PEER_LINKS, MAX_QUEUED_WANTS, PEER_REQUEST_TIMEOUT_S,
                          PEER_REQUESTS, PEER_WAIT_S, choose_holder, fallback_due, rarest_first, seeded)

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class NodeClass:
    """One kind of node in the mix: its share of the nodes, its links and its speed."""

    name: str
    kind: str  # "browser" or "trainer", as the coordinator lists nodes
    share: float
    up_mbit: float
    down_mbit: float
    latency_ms: float  # one way, to the Internet's core
    step_s: float  # one inner step of `base` (batch 16 x 256 tokens); other sizes scale with their parameter count


# The mix: two thirds of the nodes are browsers on home broadband (cable or fibre: 100 Mbit/s down, 20 up), a sixth
# browsers on slow links (DSL or mobile: 25 down, 5 up) and a sixth GPU trainers in data centres (1 Gbit/s each way).
# Step times are estimates for `base`: a browser's WGSL step at ~4k tokens/s on a laptop-class GPU, whatever its link
# (the WGSL `tiny` step ran at 114k tokens/s on an H100, bench/README.md, and `base` costs ~80x the FLOPs per token),
# and a trainer's torch step at ~40k tokens/s. Every node runs the job's H steps (shared/agent.py lets no node plan
# more), so trainers wait for the browsers: their utilisation is low by construction, the browsers' shows the network.
MIX = (
    NodeClass("browser", "browser", 4 / 6, up_mbit=20, down_mbit=100, latency_ms=15, step_s=1.0),
    NodeClass("browser-slow", "browser", 1 / 6, up_mbit=5, down_mbit=25, latency_ms=30, step_s=1.0),
    NodeClass("trainer", "trainer", 1 / 6, up_mbit=1000, down_mbit=1000, latency_ms=2, step_s=0.1),
)
RATE_SPREAD = 0.25  # each node's rates are its class's times a log-normal factor (median 1, this sigma)
COORDINATOR_MBIT = 1000.0  # a cloud VM's link, each way
COORDINATOR_LATENCY_MS = 2.0
LINK_HANDSHAKE_RTTS = 3  # ICE checks, DTLS, SCTP: direct round trips after the answer arrives

# Sizes measured on the real job (bench_model_fetch, tests/test_simulate.py, `python -m server simulate`):
INT8_DELTA_RATIO = 8.1  # a round's int8 delta (deflated) is the snapshot / 8.1: base's 5.4 MB against 43.8 MB
UPDATE_RATIOS = {"fp32": 1.0, "fp16": 2.0, "int8": 4.34, "topk": 31.0}  # a pseudo-gradient's fp32 bytes / its codec's
SHARD_BYTES = 64 * 1024  # server.corpus.SHARD_BYTES: each assignment names a shard, fetched over HTTP
CONTROL_BYTES_PER_NODE = 2_300  # RoundOpen (config, rules), UpdateResult, RoundClosed, Receipt: per node and round

COORDINATOR = "coordinator"


class NetworkError(ValueError):
    """The network model was asked for something it cannot run."""


@dataclass(frozen=True)
class NetworkOptions:
    """One modelled run. `peers` as the coordinator's --peers (0: the star); `churn`: the share of nodes that leave as
    each round after the first opens, replaced by as many newcomers who join it (advise_joiner) and fetch the
    snapshot; `browser_port`: a browser applies deltas only where the standard-library NodePort.applies_delta does
    (models of up to DELTA_STDLIB_MAX_BYTES), else fetches the snapshot; off, every node applies them."""

    nodes: int = 100
    peers: int = DEFAULT_PEERS
    rounds: int = 3
    model: str = "base"
    inner_steps: int = 50
    update_codec: str = "int8"
    churn: float = 0.0
    coordinator_mbit: float = COORDINATOR_MBIT
    browser_port: bool = False
    seed: int = 0
    mix: tuple[NodeClass, ...] = MIX

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.rounds < 1 or self.inner_steps < 1:
            raise NetworkError("nodes, rounds and inner_steps must be at least 1")
        if self.peers < 0:
            raise NetworkError(f"peers must be at least 0 (0 is the star), got {self.peers}")
        if self.model not in MODEL_SIZES:
            raise NetworkError(f"unknown model {self.model!r}; known: {', '.join(MODEL_SIZES)}")
        if self.update_codec not in UPDATE_RATIOS:
            raise NetworkError(f"unknown update codec {self.update_codec!r}; known: {', '.join(UPDATE_RATIOS)}")
        if not 0.0 <= self.churn < 1.0:
            raise NetworkError(f"churn must be a fraction in [0, 1), got {self.churn}")
        if self.coordinator_mbit <= 0 or not math.isclose(sum(c.share for c in self.mix), 1.0):
            raise NetworkError("the coordinator needs a positive rate, and the mix's shares must add up to 1")


# -- what travels -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blobs:
    """A manifest and its chunks as the coordinator publishes them: names and sizes (shared/manifest.py's format)."""

    manifest: str
    manifest_bytes: int
    chunks: tuple[str, ...]
    sizes: dict  # blob name -> bytes, the manifest's included

    @property
    def payload_bytes(self) -> int:
        return sum(self.sizes[c] for c in self.chunks)


def _name(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def publish(round_: int, kind: str, size: int, base: str = "") -> Blobs:
    """The blobs of one model (kind "snapshot") or delta of `size` bytes: chunks of BLOB_CHUNK_BYTES under a
    manifest whose size is the real manifest's."""
    count = -(-size // BLOB_CHUNK_BYTES)
    chunks = tuple(_name(round_, kind, i) for i in range(count))
    sizes = {c: min(BLOB_CHUNK_BYTES, size - i * BLOB_CHUNK_BYTES) for i, c in enumerate(chunks)}
    manifest = Manifest(round_, kind, base, _name(round_, "model"), "int8" if kind == "delta" else "fp32", size,
                        chunks, "0" * 128)
    data = manifest.to_bytes()
    name = hashlib.sha256(data).hexdigest()
    return Blobs(name, len(data), chunks, {**sizes, name: len(data)})


# -- bandwidth ----------------------------------------------------------------------------------------------------


class Flows:
    """Transfers in progress. A flow's rate is the smaller of its sender's uplink over that uplink's flows and its
    receiver's downlink over that downlink's flows; rates change only when a flow starts or ends."""

    DONE_BYTES = 0.5  # a flow with less than half a byte to go has arrived (float rounding)

    def __init__(self, up: np.ndarray, down: np.ndarray) -> None:
        self.up, self.down = up, down  # bytes/s per endpoint
        self.n_up = np.zeros(len(up), np.int64)
        self.n_down = np.zeros(len(down), np.int64)
        self.src = np.zeros(0, np.int64)
        self.dst = np.zeros(0, np.int64)
        self.left = np.zeros(0)
        self.rate = np.zeros(0)
        self.moved = 0.0  # bytes moved by every flow so far, partial ones included
        self.done: list[Callable | None] = []
        self._free: list[int] = []
        self._active: dict[int, None] = {}
        self._idx = np.zeros(0, np.int64)
        self._dirty = False
        self._next = math.inf
        self.t = 0.0

    def _settle(self, now: float) -> None:
        if self._idx.size and now > self.t:
            moved = np.minimum(self.rate[self._idx] * (now - self.t), self.left[self._idx])
            self.left[self._idx] -= moved
            self.moved += float(moved.sum())
        self.t = now

    def start(self, now: float, src: int, dst: int, size: float, done: Callable) -> int:
        self._settle(now)
        if not self._free:
            grow = max(64, len(self.left))
            self.src = np.concatenate([self.src, np.zeros(grow, np.int64)])
            self.dst = np.concatenate([self.dst, np.zeros(grow, np.int64)])
            self.left = np.concatenate([self.left, np.zeros(grow)])
            self.rate = np.concatenate([self.rate, np.zeros(grow)])
            self._free = list(range(len(self.done) + grow - 1, len(self.done) - 1, -1))
            self.done += [None] * grow
        slot = self._free.pop()
        self.src[slot], self.dst[slot], self.left[slot], self.done[slot] = src, dst, size, done
        self.n_up[src] += 1
        self.n_down[dst] += 1
        self._active[slot] = None
        self._dirty = True
        return slot

    def cancel(self, now: float, slot: int) -> None:
        """Stop a flow (its link closed): what it moved so far stays counted at both ends."""
        if slot in self._active:
            self._settle(now)
            self._remove(slot)

    def _remove(self, slot: int) -> None:
        del self._active[slot]
        self.n_up[self.src[slot]] -= 1
        self.n_down[self.dst[slot]] -= 1
        self.done[slot] = None
        self._free.append(slot)
        self._dirty = True

    def next_time(self) -> float:
        if self._dirty:
            self._idx = np.fromiter(self._active, np.int64, len(self._active))
            if self._idx.size:
                src, dst = self.src[self._idx], self.dst[self._idx]
                rate = np.minimum(self.up[src] / self.n_up[src], self.down[dst] / self.n_down[dst])
                self.rate[self._idx] = rate
                self._next = self.t + float(np.min(self.left[self._idx] / rate))
            else:
                self._next = math.inf
            self._dirty = False
        return self._next

    def finish(self, now: float) -> list[Callable]:
        """The flows that have arrived by `now`, removed; their callbacks, in slot order."""
        self._settle(now)
        arrived = self._idx[self.left[self._idx] <= self.DONE_BYTES]
        callbacks = []
        for slot in arrived.tolist():
            callbacks.append(self.done[slot])
            self._remove(slot)
        return callbacks


# -- nodes --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One blob asked of a peer (peer is its id) or of the coordinator (peer None), for one Fetch."""

    fetch: "Fetch"
    name: str
    peer: str | None
    done: bool = False


@dataclass(eq=False)
class PeerView:
    """A node's side of one peer link, as shared/swarm.py's Peer."""

    node: "ModelNode"
    dialed: bool
    opened: bool = False
    have: set = field(default_factory=set)
    good: int = 0
    requests: dict = field(default_factory=dict)  # blob name -> the Request waiting for it
    wants: deque = field(default_factory=deque)  # the peer's Wants this node has still to serve
    serving: int | None = None  # the flow of the blob being sent to it
    served: set = field(default_factory=set)  # the blobs sent to it (each once, as Swarm._serve)


class Fetch:
    """One Swarm.fetch call: every blob in `names`, from peers first (rarest first, the holder by choose_holder) and
    from the coordinator for the seed share at once and for the rest once fallback_due says so (its peers made no
    progress on this fetch for PEER_WAIT_S). `step` is one pass of Swarm.fetch's loop, line for line, run whenever
    something that loop waits for happens (a Have, a link opening or closing, a blob or Missing, its timeout)."""

    def __init__(self, node: "ModelNode", names: list[str], seed: Callable[[int], bool],
                 done: Callable[[], None]) -> None:
        self.node, self.names, self.done = node, names, done
        self.got = {n for n in names if n in node.held}
        self.wanted = [n for n in dict.fromkeys(names) if n not in self.got]
        self.queue = [n for i, n in enumerate(names) if seed(i) and n in self.wanted]
        self.running: dict[str, Request] = {}
        self.asked: dict[str, set[str]] = {}
        self.last_progress, self.offers = node.net.now, 0
        self.timer: float | None = None  # when the pending wake-up for fallback_due is due
        self.finished = False
        node.fetches.append(self)
        self.step()

    def holders(self, name: str) -> list[PeerView]:
        tried = self.asked.get(name, ())
        return [p for p in self.node.open_peers() if name in p.have and p.node.id not in tried]

    def step(self) -> None:
        if self.finished:
            return
        node, net = self.node, self.node.net
        if len(self.got) == len(set(self.names)):
            self.finished = True
            node.fetches.remove(self)
            self.done()
            return
        busy = set(self.running)
        missing = [n for n in self.wanted if n not in self.got and n not in busy]
        now_offered = sum(len(self.holders(n)) for n in missing)
        if now_offered > self.offers:  # a peer now offers something this fetch lacks
            self.last_progress = net.now
        self.offers = now_offered
        due = fallback_due(net.now, self.last_progress, PEER_WAIT_S, bool(node.peers))
        if due:
            self.queue += [n for n in missing if n not in self.queue and not self.holders(n)]
        while self.queue and sum(1 for r in self.running.values() if r.peer is None) < COORDINATOR_REQUESTS:
            name = self.queue.pop(0)
            if name not in self.got and name not in busy:
                self.running[name] = node.ask_coordinator(self, name)
                busy.add(name)
        load = {p.node.id: sum(1 for r in self.running.values() if r.peer == p.node.id) for p in node.open_peers()}
        candidates = [n for n in missing if n not in busy]
        for name in rarest_first(candidates, {n: len(self.holders(n)) for n in candidates}, net.rng):
            holders = [p for p in self.holders(name) if load[p.node.id] < PEER_REQUESTS]
            if holders:
                peer = node.peers[choose_holder([(p.node.id, load[p.node.id], p.good) for p in holders], net.rng)]
                load[peer.node.id] += 1
                self.asked.setdefault(name, set()).add(peer.node.id)
                self.running[name] = node.ask_peer(self, peer, name)
        if not self.running and due and not self.queue:
            raise NetworkError("a fetch has nothing left to try (the coordinator serves every blob here)")
        if not due and self.timer is None:  # Swarm.fetch's wait times out when fallback_due would turn true
            # (one tick later where float rounding puts last_progress + PEER_WAIT_S a hair short of it)
            self.timer = max(self.last_progress + PEER_WAIT_S, math.nextafter(net.now, math.inf))
            net.at(self.timer, self._wake)

    def _wake(self) -> None:
        self.timer = None
        self.step()

    def arrived(self, request: Request, ok: bool) -> None:
        if self.running.get(request.name) is not request:
            return
        del self.running[request.name]
        if ok:
            self.got.add(request.name)
            self.node.hold([request.name])
            if request.peer is not None:
                self.last_progress = self.node.net.now
        elif request.peer is None:
            raise NetworkError(f"the coordinator did not serve {request.name[:12]}")
        self.step()


class ModelNode:
    """One node: its links, what it holds, and its round (Node._round's order: model, shard, train, upload)."""

    def __init__(self, net: "Network", node_id: str, cls: NodeClass, endpoint: int, up: float, down: float) -> None:
        self.net, self.id, self.cls, self.ep = net, node_id, cls, endpoint
        self.up, self.down, self.latency = up, down, cls.latency_ms / 1000
        self.peers: dict[str, PeerView] = {}
        self.banned: set[str] = set()
        self.held: set[str] = set()
        self.model = -1  # the newest round whose model this node holds
        self.fetches: list[Fetch] = []
        self._announce: list[str] = []
        self.reset()

    def reset(self) -> None:
        """Counters of one round."""
        self.from_peers = self.from_coordinator = self.to_peers = self.update_bytes = 0
        self.model_at = self.done_at = math.nan
        self.compute_s = 0.0

    def path(self, other: "ModelNode | None") -> float:
        return self.latency + (other.latency if other is not None else self.net.coordinator_latency)

    def open_peers(self) -> list[PeerView]:
        return [p for p in self.peers.values() if p.opened]

    # -- links (Swarm.advise, on_signal, opened, lost) --------------------------------------------------------

    def advise(self, peers: tuple[str, ...]) -> None:
        net = self.net
        for peer_id in dict.fromkeys(peers):
            if peer_id == self.id or peer_id in self.peers or peer_id in self.banned or peer_id not in net.nodes:
                continue
            if len(self.peers) >= MAX_PEER_LINKS:
                break
            other = net.nodes[peer_id]
            self.peers[peer_id] = PeerView(other, dialed=True)
            net.at(net.now + self.path(None) + other.path(None), other.offered, self)  # relayed by the coordinator

    def offered(self, dialer: "ModelNode") -> None:
        net = self.net
        if dialer.id in self.banned or dialer.id in self.peers or len(self.peers) >= MAX_PEER_LINKS:
            return
        self.peers[dialer.id] = PeerView(dialer, dialed=False)
        relayed = self.path(None) + dialer.path(None)
        handshake = LINK_HANDSHAKE_RTTS * 2 * self.path(dialer)
        net.at(net.now + relayed + handshake, net.link_opened, dialer, self)

    def opened(self, peer_id: str) -> None:
        peer = self.peers[peer_id]
        peer.opened = True
        if self.held:
            self.net.at(self.net.now + self.path(peer.node), peer.node.heard_have, self, list(self.held))
        self.changed()

    def lost(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        for request in list(peer.requests.values()):
            self.net.resolve(request, False)
        if peer.serving is not None:
            self.net.flows.cancel(self.net.now, peer.serving)
        self.changed()

    def changed(self) -> None:
        for fetch in list(self.fetches):
            fetch.step()

    # -- holdings (Swarm.hold, _flush_have) ------------------------------------------------------------------

    def hold(self, names: list[str]) -> None:
        new = [n for n in names if n not in self.held]
        self.held.update(new)
        if new and self.peers:
            if not self._announce:
                self.net.at(self.net.now + HAVE_FLUSH_S, self._flush_have)
            self._announce.extend(new)

    def _flush_have(self) -> None:
        names, self._announce = self._announce, []
        for peer in self.open_peers():
            self.net.at(self.net.now + self.path(peer.node), peer.node.heard_have, self, names)

    def heard_have(self, src: "ModelNode", names: list[str]) -> None:
        peer = self.peers.get(src.id)
        if peer is not None and peer.opened:
            peer.have.update(names)
            self.changed()

    # -- requests (Swarm._from_peer, _from_coordinator, _serve) ----------------------------------------------

    def ask_coordinator(self, fetch: Fetch, name: str) -> Request:
        request = Request(fetch, name, None)
        self.net.from_coordinator(self, self.net.sizes[name], lambda: self.net.resolve(request, True))
        return request

    def ask_peer(self, fetch: Fetch, peer: PeerView, name: str) -> Request:
        net = self.net
        request = Request(fetch, name, peer.node.id)
        peer.requests[name] = request
        net.at(net.now + self.path(peer.node), peer.node.wanted, self, name)
        net.at(net.now + PEER_REQUEST_TIMEOUT_S, self._timed_out, peer.node.id, request)
        return request

    def _timed_out(self, peer_id: str, request: Request) -> None:
        """Swarm._from_peer: a request still open after PEER_REQUEST_TIMEOUT_S drops the link to that peer (not a
        ban: the tracker may advise it again), which fails the link's other requests too."""
        if request.done:
            return
        peer = self.peers.get(peer_id)
        if peer is not None and peer.requests.get(request.name) is request:
            self.net.timeouts += 1
            self.net.drop_link(self, peer.node)
        self.net.resolve(request, False)

    def wanted(self, src: "ModelNode", name: str) -> None:
        peer = self.peers.get(src.id)
        if peer is None or not peer.opened:
            return
        if len(peer.wants) >= MAX_QUEUED_WANTS:
            self.net.at(self.net.now + self.path(src), src.heard_missing, self, name)
            return
        peer.wants.append(name)
        if peer.serving is None:
            self._serve(peer)

    def _serve(self, peer: PeerView) -> None:
        """Send the peer's next wanted blob: one at a time per link, as Swarm._serve."""
        net = self.net
        while peer.wants:
            name = peer.wants.popleft()
            if name not in self.held or name in peer.served:  # each blob is served to a peer once
                net.at(net.now + self.path(peer.node), peer.node.heard_missing, self, name)
                continue
            size = net.sizes[name]

            def sent(peer: PeerView = peer, name: str = name, size: int = size) -> None:
                peer.serving = None
                self.to_peers += size
                peer.served.add(name)
                net.at(net.now + self.path(peer.node), peer.node.heard_blob, self, name)
                if self.peers.get(peer.node.id) is peer:
                    self._serve(peer)

            peer.serving = net.flows.start(net.now, self.ep, peer.node.ep, size, sent)
            return

    def heard_blob(self, src: "ModelNode", name: str) -> None:
        peer = self.peers.get(src.id)
        if peer is None:
            return
        request = peer.requests.pop(name, None)
        if request is None or request.done:
            # Swarm.frame: a blob this node did not ask for bans its sender (a timed-out request dropped the link,
            # so no late blob gets here: this counts what would be a bug in the model)
            self.net.bans += 1
            self.banned.add(src.id)
            self.net.drop_link(self, src)
            return
        peer.good += 1
        self.from_peers += self.net.sizes[name]
        self.net.resolve(request, True)

    def heard_missing(self, src: "ModelNode", name: str) -> None:
        peer = self.peers.get(src.id)
        if peer is None:
            return
        peer.have.discard(name)
        request = peer.requests.pop(name, None)
        if request is not None:
            self.net.resolve(request, False)

    # -- the round (Node._round, _fetch_blobs, _serve_snapshot) -----------------------------------------------

    def round_open(self, round_: int, advice) -> None:
        net = self.net
        self.advise(advice.peers)
        snapshot, delta = net.snapshot, net.delta

        def manifest_seed(index: int) -> bool:  # Node._seeded(assignment, manifest=True)
            return advice.seed_slot == 0

        def chunk_seed(index: int) -> bool:  # Node._seeded(assignment)
            return seeded(index, advice.seed_slot, advice.seed_slots)

        if self.model == round_ - 1 and delta is not None and net.applies_delta(self):
            def delta_chunks() -> None:
                Fetch(self, list(delta.chunks), chunk_seed, applied)

            def applied() -> None:
                Fetch(self, [snapshot.manifest], manifest_seed, lambda: self.hold(list(snapshot.chunks)))
                self.model_held(round_)

            Fetch(self, [delta.manifest], manifest_seed, delta_chunks)
        else:
            Fetch(self, [snapshot.manifest], manifest_seed,
                  lambda: Fetch(self, list(snapshot.chunks), chunk_seed, lambda: self.model_held(round_)))

    def model_held(self, round_: int) -> None:
        net = self.net
        self.model, self.model_at = round_, net.now
        net.from_coordinator(self, SHARD_BYTES, self.train, shard=True)

    def train(self) -> None:
        net = self.net
        self.compute_s = net.options.inner_steps * self.cls.step_s * net.step_scale
        net.at(net.now + self.compute_s, self.upload)

    def upload(self) -> None:
        net = self.net
        self.update_bytes = net.update_bytes
        net.flows.start(net.now, self.ep, net.coordinator_ep, net.update_bytes,
                        lambda: net.at(net.now + self.path(None), net.update_in, self))


# -- the model ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundReport:
    """One modelled round. Times in seconds from the round's opening; bytes per round; means over the round's nodes.
    A node's download is the model's blobs it received; its upload what it served to peers and its update."""

    round: int
    nodes: int
    newcomers: int
    model_s: float  # the data plane: until the last node holds the round's model
    model_s_median: float
    round_s: float  # until the last update is in
    delta_bytes: int
    coordinator_blob_bytes: int  # the coordinator's egress of manifests and chunks
    coordinator_bytes: int  # ... and of shards and control messages: all it sent
    from_peers: int  # model bytes that came from peers, all nodes together
    from_coordinator: int
    download_mean: float
    upload_mean: float
    peer_upload_mean: float
    download_over_upload: float  # share of nodes that downloaded more than they uploaded
    download_over_peer_upload: float  # ... more than they served to peers
    utilisation: float  # mean over nodes of compute / round time
    utilisation_by_kind: dict
    bans: int  # peers banned for a blob not asked for (none: nothing lies, and a timeout drops the link)
    timeouts: int  # peer links dropped for a request that timed out (PEER_REQUEST_TIMEOUT_S)
    to_peers: int  # model bytes nodes served to peers, all nodes together
    updates: int  # update bytes that reached the coordinator
    bytes_moved: float  # by every flow of the round (blobs, shards, updates; cut-off flows in part)

    @property
    def coordinator_deltas(self) -> float:
        """The coordinator's egress of model blobs (chunks and manifests) in deltas' worth."""
        return self.coordinator_blob_bytes / self.delta_bytes if self.delta_bytes else math.nan

    @property
    def coordinator_all_deltas(self) -> float:
        """All the coordinator sent (blobs, shards, control messages) in deltas' worth."""
        return self.coordinator_bytes / self.delta_bytes if self.delta_bytes else math.nan


class Network:
    """Runs the modelled rounds on a virtual clock: `run()` returns a RoundReport per round."""

    def __init__(self, options: NetworkOptions) -> None:
        self.options = o = options
        self.rng = random.Random(o.seed)
        self.now = 0.0
        self._events: list = []
        self._seq = 0
        params = num_parameters(MODEL_SIZES[o.model])
        self.snapshot_bytes = 4 * params
        self.delta_bytes = round(self.snapshot_bytes / INT8_DELTA_RATIO)
        self.update_bytes = round(self.snapshot_bytes / UPDATE_RATIOS[o.update_codec])
        self.step_scale = params / num_parameters(MODEL_SIZES["base"])
        self.coordinator_latency = COORDINATOR_LATENCY_MS / 1000
        endpoints = 1 + o.nodes + math.ceil(o.churn * o.nodes) * o.rounds
        up, down = np.zeros(endpoints), np.zeros(endpoints)
        self.coordinator_ep = 0
        up[0] = down[0] = o.coordinator_mbit * MBIT
        self.flows = Flows(up, down)
        self.nodes: dict[str, ModelNode] = {}
        self._endpoints = 1
        self.sizes: dict[str, int] = {}
        self.snapshot: Blobs | None = None
        self.delta: Blobs | None = None
        self.bans = self.timeouts = 0
        self._browser_applies_delta: bool | None = None
        self._coordinator_blob_bytes = self._coordinator_bytes = 0
        self._updates_in = 0
        for _ in range(o.nodes):
            self._join(model=-1)

    def _join(self, model: int) -> ModelNode:
        cls = self.rng.choices(self.options.mix, [c.share for c in self.options.mix])[0]
        up, down = (rate * MBIT * math.exp(self.rng.gauss(0.0, RATE_SPREAD)) for rate in (cls.up_mbit, cls.down_mbit))
        ep = self._endpoints
        self._endpoints += 1
        node = ModelNode(self, _name(self.options.seed, "node", ep), cls, ep, up, down)
        self.flows.up[ep], self.flows.down[ep] = node.up, node.down
        node.model = model
        self.nodes[node.id] = node
        return node

    # -- the clock ------------------------------------------------------------------------------------------------

    def at(self, time: float, callback: Callable, *args) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, callback, args))

    def _run_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            flow_time = self.flows.next_time()
            event_time = self._events[0][0] if self._events else math.inf
            if flow_time == event_time == math.inf:
                raise NetworkError("the model stalled: nothing is in flight and the round is not done")
            if flow_time <= event_time:
                self.now = max(self.now, flow_time)
                for callback in self.flows.finish(self.now):
                    callback()
            else:
                time, _, callback, args = heapq.heappop(self._events)
                self.now = max(self.now, time)
                callback(*args)

    # -- what nodes and links do through the model ----------------------------------------------------------------

    def from_coordinator(self, node: ModelNode, size: int, done: Callable[[], None], shard: bool = False) -> None:
        """An HTTP GET of the coordinator (a blob, or a shard): the request's latency, the flow, the data's."""
        def served() -> None:
            self._coordinator_bytes += size
            if not shard:
                self._coordinator_blob_bytes += size
                node.from_coordinator += size
            self.at(self.now + node.path(None), done)

        def asked() -> None:
            self.flows.start(self.now, self.coordinator_ep, node.ep, size, served)

        self.at(self.now + node.path(None), asked)

    def resolve(self, request: Request, ok: bool) -> None:
        if not request.done:
            request.done = True
            request.fetch.arrived(request, ok)

    def link_opened(self, dialer: ModelNode, answerer: ModelNode) -> None:
        a, b = dialer.peers.get(answerer.id), answerer.peers.get(dialer.id)
        if a is None or b is None or a.node is not answerer or b.node is not dialer:
            return
        dialer.opened(answerer.id)
        answerer.opened(dialer.id)

    def drop_link(self, node: ModelNode, other: ModelNode) -> None:
        node.lost(other.id)
        other.lost(node.id)

    def applies_delta(self, node: ModelNode) -> bool:
        """NodePort.applies_delta of this node's port: the trainer's applies any delta, and so does every node
        without browser_port; with it, a browser asks the default port's (BrowserPort keeps it) about a model of
        this size, as load_model keeps it."""
        if not self.options.browser_port or node.cls.kind != "browser":
            return True
        if self._browser_applies_delta is None:
            port = NodePort()
            self._browser_applies_delta = port.applies_delta(port.load_model("", bytes(self.snapshot_bytes)))
        return self._browser_applies_delta

    def update_in(self, node: ModelNode) -> None:
        node.done_at = self.now
        self._updates_in += 1

    # -- rounds ---------------------------------------------------------------------------------------------------

    def _warm_start(self) -> None:
        """Before the first modelled round the swarm has been running: every node holds the last model, and the
        tracker's links among them are open."""
        for node in self.nodes.values():
            node.model = 0
        for node_id, advice in advise(list(self.nodes), self.options.peers).items():
            node = self.nodes[node_id]
            for peer_id in advice.peers:
                other = self.nodes[peer_id]
                if peer_id not in node.peers and node_id not in other.peers:
                    node.peers[peer_id] = PeerView(other, dialed=True, opened=True)
                    other.peers[node_id] = PeerView(node, dialed=False, opened=True)

    def _churn(self) -> list[ModelNode]:
        """The share `churn` of the nodes leaves (closing its links); as many newcomers join. Returned in the order
        they join."""
        count = round(self.options.churn * len(self.nodes))
        for node in self.rng.sample(sorted(self.nodes.values(), key=lambda n: n.ep), count):
            for peer_id in list(node.peers):
                self.nodes[peer_id].lost(node.id)
            del self.nodes[node.id]
        return [self._join(model=-1) for _ in range(count)]

    def run(self) -> list[RoundReport]:
        self._warm_start()
        reports = []
        for r in range(1, self.options.rounds + 1):
            reports.append(self._round(r, self._churn() if r > 1 else []))
        return reports

    def _advice(self, joiners: list[ModelNode], r: int) -> dict:
        """What the coordinator advises each node in round r: the round opens among the nodes that were there
        (Coordinator.run: advise, the seed slots turned by the round), and each newcomer joins the open round right
        after, one after another (Intake.assign: advise_joiner among the nodes there by then, with the round's seed
        slots, or as many as there are nodes by then when that is more)."""
        new = {n.id for n in joiners}
        here = [node_id for node_id in self.nodes if node_id not in new]
        advice = advise(here, self.options.peers, r)
        opened = next(iter(advice.values())).seed_slots if advice else 1
        for joiner in joiners:
            here.append(joiner.id)
            advice[joiner.id] = advise_joiner(here, joiner.id, self.options.peers, max(opened, len(set(here))), r)
        return advice

    def _round(self, r: int, joiners: list[ModelNode]) -> RoundReport:
        opened = self.now
        self.snapshot = publish(r, "snapshot", self.snapshot_bytes)
        self.delta = publish(r, "delta", self.delta_bytes, _name(r - 1, "model"))
        self.sizes = {**self.snapshot.sizes, **self.delta.sizes}
        self.bans = self.timeouts = self._updates_in = 0
        control = CONTROL_BYTES_PER_NODE * len(self.nodes)
        self._coordinator_blob_bytes, self._coordinator_bytes = 0, control
        moved = self.flows.moved
        nodes = list(self.nodes.values())
        for node in nodes:
            node.reset()
        for node_id, advice in self._advice(joiners, r).items():
            node = self.nodes[node_id]
            self.at(self.now + node.path(None), node.round_open, r, advice)
        self._run_until(lambda: self._updates_in == len(nodes))
        round_s = self.now - opened
        self._run_until(lambda: not any(n.fetches for n in nodes))  # background snapshot manifests: same round
        model_s = sorted(n.model_at - opened for n in nodes)
        downloads = [n.from_peers + n.from_coordinator for n in nodes]
        uploads = [n.to_peers + n.update_bytes for n in nodes]
        by_kind: dict[str, list[float]] = {}
        for n in nodes:
            by_kind.setdefault(n.cls.kind, []).append(n.compute_s / round_s)
        return RoundReport(
            round=r, nodes=len(nodes), newcomers=len(joiners), model_s=model_s[-1],
            model_s_median=model_s[len(nodes) // 2],
            round_s=round_s, delta_bytes=self.delta.payload_bytes, coordinator_blob_bytes=self._coordinator_blob_bytes,
            coordinator_bytes=self._coordinator_bytes, from_peers=sum(n.from_peers for n in nodes),
            from_coordinator=sum(n.from_coordinator for n in nodes), download_mean=float(np.mean(downloads)),
            upload_mean=float(np.mean(uploads)), peer_upload_mean=float(np.mean([n.to_peers for n in nodes])),
            download_over_upload=float(np.mean([d > u for d, u in zip(downloads, uploads)])),
            download_over_peer_upload=float(np.mean([d > n.to_peers for d, n in zip(downloads, nodes)])),
            utilisation=float(np.mean([n.compute_s / round_s for n in nodes])),
            utilisation_by_kind={k: float(np.mean(v)) for k, v in sorted(by_kind.items())}, bans=self.bans,
            timeouts=self.timeouts, to_peers=sum(n.to_peers for n in nodes),
            updates=sum(n.update_bytes for n in nodes), bytes_moved=self.flows.moved - moved)


def run_network(options: NetworkOptions) -> list[RoundReport]:
    """Model `options.rounds` rounds of the data plane; one report per round."""
    return Network(options).run()
