"""A node's peer links and the blobs it trades over them: the data plane's mesh, written once for every node.

The coordinator is the tracker: each RoundOpen names a few peers to dial and this node's seed share. The node
opens a data channel to each of them through the signaling relay (any admitted node may dial it too), tells its
peers which blobs it holds (Have), and fetches what it lacks from them first, rarest first, a few at a time
(Want -> a "blob" payload, or Missing). Only the chunks of its own seed share come from the coordinator at once;
any other chunk comes from the coordinator only when its peers made no progress for PEER_WAIT_S (fallback_due).

Where the tracker names a peer's blob URL (RoundOpen.peer_urls: a trainer started with --listen) and this node's
port can fetch from it (NodePort.peer_fetch), blobs come from that peer over plain HTTP instead of the data channel;
announcements, the order of requests and every check stay as they are.

Every byte is checked: a blob travels under its sha256, so a peer that sends anything else under a name it was
asked for is banned from this node and disconnected, and the chunk is fetched elsewhere. A peer that leaves or
stalls costs a retry elsewhere. Standard library only: Pyodide runs it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.manifest import MAX_BLOB_BYTES, MAX_CHUNKS, sha256_hex
from shared.wire import (MAX_HAVE_NAMES, ChecksumMismatch, FrameReceiver, Have, Missing, Sdp,
                         WireError, Want, payload_frames)

if TYPE_CHECKING:
    from shared.node import NodePort

PEER_WAIT_S = 4.0  # how long a fetch waits on peers that make no progress before it asks the coordinator
PEER_REQUEST_TIMEOUT_S = 20.0  # one blob from one peer; then it is fetched elsewhere
PEER_OPEN_TIMEOUT_S = 15.0  # a dialed link that has not opened by then is given up (the tracker advises again)
PEER_REQUESTS = 2  # blobs in flight from one peer at once
COORDINATOR_REQUESTS = 4  # blobs in flight from the coordinator at once
MAX_PEER_LINKS = 16  # links this node keeps, dialed and accepted together
MAX_QUEUED_WANTS = 16  # a peer's requests waiting to be served; beyond that it is told Missing
MODELS_HELD = 2  # the blobs of the current model and of the one before (as the coordinator serves them)
MAX_PEER_HAVE = 2 * MODELS_HELD * (MAX_CHUNKS + 1)  # what a peer may say it holds: a snapshot and a delta per model
HAVE_FLUSH_S = 0.05  # new holdings are announced in batches
# a peer link carries a control message per blob each way; this bounds a flooding peer, not an honest one
PEER_CONTROL_RATE = 2000.0
PEER_CONTROL_BURST = 4000
MISMATCH = "sent a blob that does not match its hash"  # why a peer is banned, whichever path the blob came by


def seeded(index: int, seed_slot: int, seed_slots: int) -> bool:
    """Whether chunk `index` of a manifest is in the seed share of the node in `seed_slot` (RoundOpen): fetched from
    the coordinator at once, not first waited for from peers."""
    return index % seed_slots == seed_slot


def rarest_first(names: list[str], holders: dict[str, int], rng: random.Random | None = None) -> list[str]:
    """The blobs some peer offers, fewest holders first, ties in random order (so that peers spread their
    requests): the order in which a node asks for them."""
    shuffled = (rng or random).sample(names, len(names))
    return sorted((n for n in shuffled if holders.get(n, 0)), key=lambda n: holders[n])


def choose_holder(holders: list[tuple[str, int, int]], rng: random.Random | None = None) -> str:
    """Which of the peers offering a blob to ask, from (peer id, blobs in flight from it, blobs it served that checked
    out): the least busy, then the one with the better record, then at random."""
    r = rng or random
    return min(holders, key=lambda h: (h[1], -h[2], r.random()))[0]


def fallback_due(now: float, last_progress: float, wait_s: float, has_peers: bool) -> bool:
    """Whether a fetch asks the coordinator for what no peer offers: when this node has no peer links at all, or
    when its peers made no progress on the fetch (no blob arrived from them, no new offer of one it lacks) for
    wait_s. While peers keep delivering, the coordinator is not asked."""
    return not has_peers or now - last_progress >= wait_s


@dataclass(eq=False)
class Peer:
    """One peer link as this node sees it."""

    id: str
    dialed: bool  # we sent the offer (else we answered theirs)
    opened: bool = False
    since: float = field(default_factory=time.monotonic)
    have: set = field(default_factory=set)
    requests: dict = field(default_factory=dict)  # blob name -> the future its payload or Missing resolves
    wants: asyncio.Queue | None = None
    server: asyncio.Task | None = None
    receiver: FrameReceiver = field(default_factory=lambda: FrameReceiver(MAX_BLOB_BYTES + 1024, PEER_CONTROL_RATE,
                                                                          PEER_CONTROL_BURST))
    good: int = 0  # blobs it served that checked out
    sent: int = 0  # blobs we served it (their transfer ids)
    served: set = field(default_factory=set)  # their names: each is served to a peer once (no upload amplification)


class Swarm:
    """The peer links of one node. `port` opens them (NodePort.peer_*), `report` tells the user."""

    def __init__(self, node_id: str, port: NodePort, report: Callable[..., None]):
        self.node_id, self.port, self.report = node_id, port, report
        self.peers: dict[str, Peer] = {}
        self.banned: set[str] = set()  # peers that sent a blob that was not what it was named; never again
        self.held: dict[str, bytes | memoryview] = {}
        self._groups: OrderedDict[str, list[str]] = OrderedDict()  # model hash -> blob names held for it
        self.bytes_from_peers = self.bytes_from_coordinator = self.bytes_to_peers = 0
        self.bytes_from_peers_direct = 0  # of bytes_from_peers, those fetched from peers' blob URLs
        self.peer_urls: dict[str, str] = {}  # peer id -> its blob URL, from the tracker's advice
        self.wait_s = PEER_WAIT_S
        self._changed = asyncio.Event()
        self._announce: list[str] = []
        self._flush: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- links ---------------------------------------------------------------------------------------------

    @property
    def open_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.opened]

    async def advise(self, peers: list[str], peer_urls: dict[str, str] | None = None) -> None:
        """The tracker's advice for this round: dial each listed peer this node has no link to. The links are
        registered before any offer goes out, so that a fetch that starts meanwhile waits for them. `peer_urls`
        names the blob URLs of the peers (either way) that serve blobs over HTTP: blobs come from there when the
        port can fetch them, for as long as the link lasts (links outlive the advice that made them)."""
        # kept: those of peers linked now, and the new advice's (bounded by MAX_PEER_LINKS + MAX_PEERS)
        self.peer_urls = {p: u for p, u in self.peer_urls.items() if p in self.peers} | dict(peer_urls or {})
        now = time.monotonic()
        for peer in [p for p in self.peers.values() if not p.opened and now - p.since > PEER_OPEN_TIMEOUT_S]:
            await self.drop(peer.id, "did not open")
        dial = []
        for peer_id in dict.fromkeys(peers):
            if peer_id == self.node_id or peer_id in self.peers or peer_id in self.banned:
                continue
            if len(self.peers) >= MAX_PEER_LINKS:
                break
            self.peers[peer_id] = Peer(peer_id, dialed=True)
            dial.append(peer_id)
        for peer_id in dial:
            offer = await self.port.peer_offer(peer_id)
            if offer is None:  # this node has no peer links
                for other in dial:
                    self.peers.pop(other, None)
                return
            peer = self.peers.get(peer_id)
            if peer is not None and peer.dialed:  # not replaced meanwhile by the peer's own offer
                await self.port.send_signal(Sdp(self.node_id, peer_id, "offer", offer).encode())

    async def on_signal(self, msg: Sdp) -> None:
        """An offer or answer from another node, relayed (and its sender named) by the coordinator."""
        peer = self.peers.get(msg.src)
        if msg.sdp_type == "answer":
            if peer is not None and peer.dialed and not peer.opened:
                await self.port.peer_accept(msg.src, msg.sdp)
            return
        if msg.src in self.banned or msg.src == self.node_id:
            return
        if peer is not None:
            if peer.opened or (peer.dialed and self.node_id < msg.src):
                return  # both dialed at once: the offer of the lower node id wins
            await self.drop(msg.src, "replaced by the peer's own offer")
        if len(self.peers) >= MAX_PEER_LINKS:
            return
        answer = await self.port.peer_answer(msg.src, msg.sdp)
        if answer is not None:
            self.peers[msg.src] = Peer(msg.src, dialed=False)
            await self.port.send_signal(Sdp(self.node_id, msg.src, "answer", answer).encode())

    def opened(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or peer.opened:
            return
        peer.opened = True
        peer.wants = asyncio.Queue()
        peer.server = self.spawn(self._serve(peer))
        names = list(self.held)
        for i in range(0, len(names), MAX_HAVE_NAMES):
            self.spawn(self._send(peer, Have(names[i : i + MAX_HAVE_NAMES]).encode()))
        self._changed.set()

    def lost(self, peer_id: str, reason: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is not None:
            self._forget(peer)

    def _forget(self, peer: Peer) -> None:
        self.peer_urls.pop(peer.id, None)
        for future in peer.requests.values():
            if not future.done():
                future.set_result(None)
        if peer.server is not None:
            peer.server.cancel()
        self._changed.set()

    async def drop(self, peer_id: str, reason: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is not None:
            self._forget(peer)
            await self.port.peer_close(peer_id)

    async def close(self) -> None:
        for peer_id in list(self.peers):
            await self.drop(peer_id, "leaving")
        for task in list(self._tasks):
            task.cancel()

    def _ban(self, peer: Peer, why: str) -> None:
        self.banned.add(peer.id)
        self.report("notice", message=f"peer {peer.id[:12]}… {why}; it is disconnected and not asked again")
        self.spawn(self.drop(peer.id, why))

    # -- frames from peers ---------------------------------------------------------------------------------

    def frame(self, peer_id: str, frame: str | bytes) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.opened:
            return
        try:
            item = peer.receiver.feed(frame)
        except ChecksumMismatch:
            self._ban(peer, MISMATCH)
            return
        except WireError as e:
            self._ban(peer, f"broke the protocol ({e})")
            return
        if isinstance(item, tuple):
            header, data = item
            future = peer.requests.get(header.sha256)
            if header.kind != "blob" or future is None or future.done():
                self._ban(peer, "sent a blob that was not asked for, or not under the name asked for")
                return
            future.set_result(data)
        elif isinstance(item, Have):
            peer.have.update(item.names)
            if len(peer.have) > MAX_PEER_HAVE:
                self._ban(peer, f"announced more than {MAX_PEER_HAVE} blobs")
                return
            self._changed.set()
        elif isinstance(item, Want):
            if peer.wants.qsize() >= MAX_QUEUED_WANTS:
                self.spawn(self._send(peer, Missing(item.name).encode()))
            else:
                peer.wants.put_nowait(item.name)
        elif isinstance(item, Missing):
            peer.have.discard(item.name)
            future = peer.requests.get(item.name)
            if future is not None and not future.done():
                future.set_result(None)

    async def _serve(self, peer: Peer) -> None:
        """Answer a peer's Wants one at a time, from what this node holds."""
        while True:
            name = await peer.wants.get()
            data = self.held.get(name)
            if data is None or name in peer.served:
                await self._send(peer, Missing(name).encode())
                continue
            peer.sent = (peer.sent + 1) % (1 << 32)
            header, chunks = payload_frames(peer.sent, "blob", data)
            try:
                await self.port.peer_send(peer.id, header.encode())
                for chunk in chunks:
                    await self.port.peer_send(peer.id, chunk)
            except Exception as e:  # noqa: BLE001 - the port's closed-link errors differ per node
                self.spawn(self.drop(peer.id, f"sending failed: {e}"))  # not from this task, which drop cancels
                return
            self.bytes_to_peers += len(data)
            peer.served.add(name)

    def serve_direct(self, name: str) -> bytes | memoryview | None:
        """A held blob for a request that came over this node's own blob server (--listen), counted as served to
        peers; None when it is not held."""
        data = self.held.get(name)
        if data is not None:
            self.bytes_to_peers += len(data)
        return data

    async def _send(self, peer: Peer, text: str) -> None:
        try:
            await self.port.peer_send(peer.id, text)
        except Exception as e:  # noqa: BLE001
            self.spawn(self.drop(peer.id, f"sending failed: {e}"))

    # -- holdings ------------------------------------------------------------------------------------------

    def hold(self, model_hash: str, blobs: dict[str, bytes | memoryview]) -> None:
        """Serve these blobs (named by their sha256) from now on, as part of model `model_hash`'s; announce them.
        The blobs of models older than the MODELS_HELD newest are dropped."""
        names = self._groups.setdefault(model_hash, [])
        self._groups.move_to_end(model_hash)
        new = [name for name in blobs if name not in self.held]
        self.held.update(blobs)
        names.extend(new)
        while len(self._groups) > MODELS_HELD:
            _, old = self._groups.popitem(last=False)
            keep = {n for group in self._groups.values() for n in group}
            for name in old:
                if name not in keep:
                    self.held.pop(name, None)
        if new and self.peers:
            self._announce.extend(new)
            if self._flush is None or self._flush.done():
                self._flush = self.spawn(self._flush_have())

    async def _flush_have(self) -> None:
        await asyncio.sleep(HAVE_FLUSH_S)
        names, self._announce = self._announce, []
        for peer in self.open_peers:
            for i in range(0, len(names), MAX_HAVE_NAMES):
                await self._send(peer, Have(names[i : i + MAX_HAVE_NAMES]).encode())

    # -- fetching ------------------------------------------------------------------------------------------

    async def fetch(self, model_hash: str, names: list[str], seeded: Callable[[int], bool],
                    coordinator: Callable[[str], Awaitable[bytes | None]]) -> dict[str, bytes] | None:
        """Every blob in `names`, each checked against its name: from what is held, from peers (rarest first), and
        from `coordinator` for the seed share (`seeded(index)`) at once, and for the rest once peers made no
        progress on this fetch for wait_s (at once when no peer link is open or being opened): see fallback_due.
        Each blob is held (served to peers, as part of model `model_hash`'s) as soon as it arrives. None when the
        coordinator cannot serve one either."""
        got: dict[str, bytes] = {n: bytes(self.held[n]) for n in names if n in self.held}
        wanted = [n for n in dict.fromkeys(names) if n not in got]
        queue = [n for i, n in enumerate(names) if seeded(i) and n in wanted]  # from the coordinator, in order
        share = set(queue)  # this node's seed share: from the coordinator whatever peers offer
        running: dict[asyncio.Task, tuple[str, Peer | None]] = {}
        asked: dict[str, set[str]] = {}  # blob name -> peers asked for it
        last_progress, offers = time.monotonic(), 0
        try:
            while len(got) < len(set(names)):
                busy = {name for name, _ in running.values()}
                missing = [n for n in wanted if n not in got and n not in busy]
                now_offered = sum(len(self._holders(n, asked)) for n in missing)
                if now_offered > offers:  # a peer now offers something this fetch lacks
                    last_progress = time.monotonic()
                offers = now_offered
                due = fallback_due(time.monotonic(), last_progress, self.wait_s, bool(self.peers))
                if due:
                    queue += [n for n in missing if n not in queue and not self._holders(n, asked)]
                while queue and sum(1 for _, p in running.values() if p is None) < COORDINATOR_REQUESTS:
                    name = queue.pop(0)
                    if name not in share and self._holders(name, asked):
                        continue  # queued as a fallback, and a peer offers it since: it comes from the peer
                    if name not in got and name not in busy:
                        running[self.spawn(self._from_coordinator(name, coordinator))] = (name, None)
                        busy.add(name)
                load = {p.id: sum(1 for _, q in running.values() if q is p) for p in self.open_peers}
                for name in self._rarest_first([n for n in missing if n not in busy], asked):
                    holders = [p for p in self._holders(name, asked) if load[p.id] < PEER_REQUESTS]
                    if holders:
                        peer = self.peers[choose_holder([(p.id, load[p.id], p.good) for p in holders])]
                        load[peer.id] += 1
                        asked.setdefault(name, set()).add(peer.id)
                        running[self.spawn(self._from_peer(peer, name))] = (name, peer)
                if not running and due and not queue:
                    return None  # nothing left to try (cannot happen while the coordinator answers)
                self._changed.clear()
                waiter = self.spawn(self._changed.wait())
                timeout = None if due else max(0.0, last_progress + self.wait_s - time.monotonic())
                done, _ = await asyncio.wait([*running, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                for task in [t for t in done if t in running]:
                    name, peer = running.pop(task)
                    data = task.result()
                    if data is not None:
                        got[name] = data
                        self.hold(model_hash, {name: data})
                        if peer is not None:
                            last_progress = time.monotonic()
                    elif peer is None:
                        return None  # the coordinator does not serve it (any more)
            return got
        finally:
            for task in running:
                task.cancel()

    def _holders(self, name: str, asked: dict[str, set[str]]) -> list[Peer]:
        tried = asked.get(name, set())
        return [p for p in self.open_peers if name in p.have and p.id not in tried]

    def _rarest_first(self, names: list[str], asked: dict[str, set[str]]) -> list[str]:
        return rarest_first(names, {n: len(self._holders(n, asked)) for n in names})

    async def _from_peer(self, peer: Peer, name: str) -> bytes | None:
        """Blob `name` from `peer`, checked: from its blob URL when it has one and the port can fetch from it, else
        (or when that does not serve it) over the data channel. None when the peer does not give it in time."""
        try:
            data, direct = await asyncio.wait_for(self._request(peer, name), PEER_REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:  # stuck, or too slow to be worth it: the link goes (the tracker may advise it
            await self.drop(peer.id, "did not answer in time")  # again next round); its half-sent blob with it
            return None
        except Exception:  # noqa: BLE001 - the link closed under us: another holder, or the coordinator
            return None
        if data is None:
            return None
        if direct and sha256_hex(data) != name:  # (the data channel's receiver checks its blobs itself)
            self._ban(peer, MISMATCH)
            return None
        peer.good += 1
        self.bytes_from_peers += len(data)
        if direct:
            self.bytes_from_peers_direct += len(data)
        return data

    async def _request(self, peer: Peer, name: str) -> tuple[bytes | None, bool]:
        """(the blob or None, whether it came from the peer's blob URL)."""
        data = await self._direct(peer, name)
        if data is not None:
            return data, True
        return await self._want(peer, name), False

    async def _direct(self, peer: Peer, name: str) -> bytes | None:
        """The blob from the peer's blob URL; None when it has none, the port cannot fetch from it, or it does not
        serve this blob. A URL that cannot be reached is not tried again until the tracker names it again."""
        url = self.peer_urls.get(peer.id)
        if not url:
            return None
        try:
            return await self.port.peer_fetch(url, name)
        except Exception as e:  # noqa: BLE001 - the port's network errors differ per node
            if self.peer_urls.pop(peer.id, None) is not None:
                self.report("notice", message=f"peer {peer.id[:12]}…'s blob URL {url} failed ({e}); its blobs come "
                                              "over the data channel until the tracker names the URL again")
            return None

    async def _want(self, peer: Peer, name: str) -> bytes | None:
        """The blob over the data channel: Want, then the "blob" payload (checked by the receiver) or Missing."""
        future = asyncio.get_running_loop().create_future()
        peer.requests[name] = future
        try:
            await self.port.peer_send(peer.id, Want(name).encode())
            return await future
        finally:
            peer.requests.pop(name, None)

    async def _from_coordinator(self, name: str, coordinator: Callable[[str], Awaitable[bytes | None]]) -> bytes | None:
        data = await coordinator(name)
        if data is None:
            return None
        self.bytes_from_coordinator += len(data)
        if sha256_hex(data) != name:
            self.report("notice", message=f"the coordinator's blob {name[:12]}… does not match its hash; not used")
            return None
        return data

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
