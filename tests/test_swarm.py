"""The chunk exchange between peers (shared/swarm.py) and the tracker's advice (server/coordinator/tracker.py), over
in-process links that carry the real wire frames: rarest first, the seed share, the coordinator as the source of
last resort, a corrupted chunk caught and its sender banned, a peer that leaves mid-transfer routed around."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os

import pytest

from server.coordinator.tracker import advise
from shared import swarm as swarm_module
from shared.manifest import cut, sha256_hex
from shared.swarm import Swarm, rarest_first, seeded
from shared.wire import Sdp, decode_message


def node_id(i: int) -> str:
    return hashlib.sha256(f"node {i}".encode()).hexdigest()


class Net:
    """Links between swarms: signaling relays Sdp (with the sender named, as the coordinator does), and a frame
    sent on a link arrives at the other end in order."""

    def __init__(self) -> None:
        self.ports: dict[str, "Port"] = {}
        self.urls: dict[str, "Port"] = {}  # blob URL -> the port serving there
        self.coordinator: dict[str, bytes] = {}
        self.coordinator_served = 0

    async def from_coordinator(self, name: str) -> bytes | None:
        await asyncio.sleep(0)
        data = self.coordinator.get(name)
        if data is not None:
            self.coordinator_served += len(data)
        return data


class Port:
    def __init__(self, net: Net, me: str, corrupt: bool = False, stall: bool = False) -> None:
        self.net, self.me, self.corrupt, self.stall = net, me, corrupt, stall
        self.links: set[str] = set()
        self.notices: list[str] = []
        self.closed: list[str] = []
        self.frames_sent = self.direct_fetches = 0
        self.swarm = Swarm(me, self, self.report)
        net.ports[me] = self

    def listen(self) -> str:
        """Serve held blobs at a blob URL (as a trainer's --listen); the URL."""
        url = f"http://node-{len(self.net.urls)}:8100"
        self.net.urls[url] = self
        return url

    async def peer_fetch(self, url: str, name: str) -> bytes | None:
        await asyncio.sleep(0)
        self.direct_fetches += 1
        target = self.net.urls.get(url)
        if target is None:
            raise ConnectionRefusedError(f"nothing listens at {url}")
        data = target.swarm.serve_direct(name)
        if data is None:
            return None
        return bytes(data[:-1]) + bytes([data[-1] ^ 1]) if target.corrupt else bytes(data)

    def report(self, event: str, **fields) -> None:
        if event == "notice":
            self.notices.append(fields["message"])

    async def send_signal(self, text: str) -> None:
        msg = decode_message(text)
        target = self.net.ports.get(msg.dst)
        if target is not None:
            await target.swarm.on_signal(Sdp(self.me, msg.dst, msg.sdp_type, msg.sdp))

    async def peer_offer(self, peer: str) -> str:
        return "offer"

    async def peer_answer(self, peer: str, offer: str) -> str:
        return "answer"

    async def peer_accept(self, peer: str, answer: str) -> None:
        other = self.net.ports[peer]
        self.links.add(peer)
        other.links.add(self.me)
        self.swarm.opened(peer)
        other.swarm.opened(self.me)

    async def peer_send(self, peer: str, frame) -> None:
        if peer not in self.links:
            raise ConnectionError("closed")
        self.frames_sent += 1
        if self.stall and isinstance(frame, bytes):
            return  # a peer that stops sending mid-transfer
        if self.corrupt and isinstance(frame, bytes):
            frame = frame[:-1] + bytes([frame[-1] ^ 1])
        await asyncio.sleep(0)
        target = self.net.ports[peer]
        if self.me in target.links:
            target.swarm.frame(self.me, frame)

    async def peer_close(self, peer: str) -> None:
        self.closed.append(peer)
        self.links.discard(peer)
        other = self.net.ports.get(peer)
        if other is not None and self.me in other.links:
            other.links.discard(self.me)
            other.swarm.lost(self.me, "closed")


def blobs(n: int, size: int = 1000) -> dict[str, bytes]:
    data = os.urandom(n * size)
    return {sha256_hex(c): bytes(c) for c in (data[i * size:(i + 1) * size] for i in range(n))}


def test_rarest_first_orders_by_holders_and_skips_what_nobody_offers():
    order = rarest_first(["a", "b", "c", "d"], {"a": 3, "b": 1, "c": 0, "d": 2})
    assert order == ["b", "d", "a"]
    assert [seeded(i, 1, 3) for i in range(6)] == [False, True, False, False, True, False]


def hops(advice: dict) -> tuple[dict, int]:
    """The links as an undirected graph, and the most hops from the first node to any other (all reachable)."""
    links: dict[str, set] = {n: set() for n in advice}
    for a, adv in advice.items():
        for b in adv.peers:
            links[a].add(b)
            links[b].add(a)
    start = next(iter(advice))
    seen, frontier, depth = {start}, [start], 0
    while frontier:
        frontier = [m for n in frontier for m in links[n] if m not in seen and not seen.add(m)]
        depth += bool(frontier)
    assert seen == set(advice)  # connected
    return links, depth


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_the_tracker_links_each_pair_once_into_a_mesh_a_few_hops_across(n):
    ids = [node_id(i) for i in range(n)]
    advice = advise(ids, 4)
    dials = {(a, b) for a, adv in advice.items() for b in adv.peers}
    assert not any((b, a) in dials for a, b in dials)  # one dialer per pair: offers never cross
    links, depth = hops(advice)
    degrees = [len(links[x]) for x in ids]
    assert min(degrees) >= 2 and 3.75 <= sum(degrees) / n <= 4  # a chord that repeats a link is dropped
    assert depth <= 2 * math.log2(n)  # chords: a ring alone would be n/4 hops across
    assert sorted(a.seed_slot for a in advice.values()) == list(range(n))
    assert {a.seed_slots for a in advice.values()} == {n}
    assert advise(ids, 4) == advise(list(reversed(ids)), 4)  # the ring does not depend on arrival order
    turned = advise(ids, 4, rotation=3)  # the next rounds: the same links, the seed slots turned along the ring
    assert all(turned[x].peers == advice[x].peers and turned[x].seed_slot == (advice[x].seed_slot + 3) % n
               for x in ids)


def test_a_few_nodes_all_link_to_each_other_and_no_peers_is_the_star():
    ids = [node_id(i) for i in range(4)]
    links, depth = hops(advise(ids, 3))
    assert depth == 1 and all(len(links[n]) == 3 for n in ids)
    assert set(advise(ids, 0).values()) == {advise(ids[:1], 4)[ids[0]]}  # peers 0, or one node: the star


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_peers_fetch_from_each_other_and_the_coordinator_sends_each_chunk_once(monkeypatch):
    monkeypatch.setattr(swarm_module, "HAVE_FLUSH_S", 0.0)

    async def main():
        net = Net()
        net.coordinator = blobs(12)
        names = list(net.coordinator)
        ids = [node_id(i) for i in range(3)]
        ports = [Port(net, i) for i in ids]
        advice = advise(ids, 2)
        for port in ports:
            await port.swarm.advise(list(advice[port.me].peers))
        results = await asyncio.gather(*(
            p.swarm.fetch("m", names, lambda i, a=advice[p.me]: seeded(i, a.seed_slot, a.seed_slots),
                          net.from_coordinator) for p in ports))
        for got in results:
            assert got == net.coordinator
        assert net.coordinator_served == sum(len(b) for b in net.coordinator.values())  # each chunk once
        assert sum(p.swarm.bytes_from_peers for p in ports) == 2 * net.coordinator_served
        assert sum(p.swarm.bytes_to_peers for p in ports) == sum(p.swarm.bytes_from_peers for p in ports)

    run(main())


def test_a_corrupted_chunk_is_dropped_its_sender_banned_and_the_chunk_fetched_elsewhere(monkeypatch):
    monkeypatch.setattr(swarm_module, "PEER_WAIT_S", 0.5)

    async def main():
        net = Net()
        net.coordinator = blobs(4)
        names = list(net.coordinator)
        honest, liar = Port(net, node_id(0)), Port(net, node_id(1), corrupt=True)
        liar.swarm.hold("m", net.coordinator)  # it holds the real chunks and sends them damaged
        await honest.swarm.advise([liar.me])
        assert honest.links == {liar.me}
        got = await honest.swarm.fetch("m", names, lambda i: False, net.from_coordinator)
        assert got == net.coordinator  # every byte checked: the right chunks, from the coordinator in the end
        assert liar.me in honest.swarm.banned and liar.me in honest.closed and not honest.links
        assert honest.swarm.bytes_from_peers == 0
        assert any("does not match its hash" in n for n in honest.notices)
        await honest.swarm.advise([liar.me])  # the tracker advises it again: it is not dialed again
        assert not honest.links

    run(main())


def test_a_peer_that_stalls_or_leaves_mid_transfer_costs_a_retry_elsewhere(monkeypatch):
    monkeypatch.setattr(swarm_module, "PEER_WAIT_S", 0.2)
    monkeypatch.setattr(swarm_module, "PEER_REQUEST_TIMEOUT_S", 0.3)

    async def main():
        net = Net()
        net.coordinator = blobs(6)
        names = list(net.coordinator)
        me, staller, good = Port(net, node_id(0)), Port(net, node_id(1), stall=True), Port(net, node_id(2))
        staller.swarm.hold("m", net.coordinator)
        good.swarm.hold("m", dict(list(net.coordinator.items())[:3]))
        await me.swarm.advise([staller.me, good.me])
        fetch = asyncio.ensure_future(me.swarm.fetch("m", names, lambda i: False, net.from_coordinator))
        await asyncio.sleep(0.05)
        await good.peer_close(me.me)  # the good peer leaves while the fetch runs
        got = await fetch
        assert got == net.coordinator
        assert not me.swarm.banned  # slow or gone is no offence: the staller's link goes, the peer is not banned
        assert staller.me in me.closed
        assert net.coordinator_served > 0  # what no live peer could give came from the coordinator

    run(main())


def test_a_blob_nobody_asked_for_bans_its_sender():
    async def main():
        net = Net()
        a, b = Port(net, node_id(0)), Port(net, node_id(1))
        await a.swarm.advise([b.me])
        from shared.wire import payload_frames
        header, chunks = payload_frames(0, "blob", b"unasked")
        await b.peer_send(a.me, header.encode())
        for chunk in chunks:
            await b.peer_send(a.me, chunk)
        await asyncio.sleep(0.01)
        assert b.me in a.swarm.banned

    run(main())


@pytest.mark.parametrize("held", [2, 3])
def test_only_the_newest_models_blobs_are_held(held):
    async def main():
        net = Net()
        port = Port(net, node_id(0))
        data = os.urandom(3 * 262144)
        for m in range(held):
            port.swarm.hold(f"model {m}", {sha256_hex(c): c for c in cut(data[m:] + bytes(m))})
        kept = {n for n in port.swarm.held}
        assert len(kept) == 3 * min(held, swarm_module.MODELS_HELD)

    run(main())


def test_a_blob_is_served_to_a_peer_once_and_a_flood_of_announcements_bans_it(monkeypatch):
    async def main():
        net = Net()
        chunk = blobs(1)
        a, b = Port(net, node_id(0)), Port(net, node_id(1))
        a.swarm.hold("m", chunk)
        await b.swarm.advise([a.me])
        (name,) = chunk
        assert await b.swarm._from_peer(b.swarm.peers[a.me], name) == chunk[name]
        assert await b.swarm._from_peer(b.swarm.peers[a.me], name) is None  # asked again: Missing, not re-sent
        assert a.swarm.bytes_to_peers == len(chunk[name])
        monkeypatch.setattr(swarm_module, "MAX_PEER_HAVE", 1000)
        from shared.wire import Have
        for start in range(0, 1200, 600):
            await a.peer_send(b.me, Have([hashlib.sha256(str(i).encode()).hexdigest()
                                          for i in range(start, start + 600)]).encode())
        await asyncio.sleep(0.01)
        assert a.me in b.swarm.banned and not b.links

    run(main())


def test_a_node_joining_an_open_round_dials_all_its_ring_neighbours():
    from server.coordinator.tracker import advise_joiner
    ids = [node_id(i) for i in range(8)]
    joiner = ids[-1]
    full = advise(ids, 4)
    neighbours = set(full[joiner].peers) | {n for n, a in full.items() if joiner in a.peers}
    advice = advise_joiner(ids, joiner, 4, 7)  # the round opened with the other 7: their split of the chunks
    assert set(advice.peers) == neighbours and len(neighbours) >= 3
    assert advice.seed_slots == 7 and 0 <= advice.seed_slot < 7


def test_blobs_come_from_a_peers_blob_url_when_the_port_can_fetch_there():
    async def main():
        net = Net()
        net.coordinator = blobs(6)
        names = list(net.coordinator)
        me, server = Port(net, node_id(0)), Port(net, node_id(1))
        server.swarm.hold("m", net.coordinator)
        await me.swarm.advise([server.me], {server.me: server.listen()})
        await asyncio.sleep(0.1)  # the Have announcements arrive over the data channel
        sent = server.frames_sent
        got = await me.swarm.fetch("m", names, lambda i: False, net.from_coordinator)
        assert got == net.coordinator and net.coordinator_served == 0
        assert me.direct_fetches == 6 and server.frames_sent == sent  # no blob, no Missing over the data channel
        assert me.swarm.bytes_from_peers == me.swarm.bytes_from_peers_direct == 6000
        assert server.swarm.bytes_to_peers == 6000
        assert server.swarm.serve_direct("0" * 64) is None  # a blob that is not held is not served

    run(main())


def test_a_blob_url_that_serves_a_damaged_blob_bans_the_peer_like_a_data_channel_would(monkeypatch):
    monkeypatch.setattr(swarm_module, "PEER_WAIT_S", 0.5)

    async def main():
        net = Net()
        net.coordinator = blobs(4)
        names = list(net.coordinator)
        honest, liar = Port(net, node_id(0)), Port(net, node_id(1), corrupt=True)
        liar.swarm.hold("m", net.coordinator)
        await honest.swarm.advise([liar.me], {liar.me: liar.listen()})
        got = await honest.swarm.fetch("m", names, lambda i: False, net.from_coordinator)
        assert got == net.coordinator  # from the coordinator in the end
        assert honest.direct_fetches >= 1 and honest.swarm.bytes_from_peers == 0
        assert liar.me in honest.swarm.banned and liar.me in honest.closed and not honest.links
        assert any(swarm_module.MISMATCH in n for n in honest.notices)

    run(main())


def test_a_blob_url_that_cannot_be_reached_leaves_the_data_channel_to_carry_the_blobs():
    async def main():
        net = Net()
        net.coordinator = blobs(4)
        names = list(net.coordinator)
        me, peer = Port(net, node_id(0)), Port(net, node_id(1))
        peer.swarm.hold("m", net.coordinator)
        await me.swarm.advise([peer.me], {peer.me: "http://gone:1"})
        await asyncio.sleep(0.1)
        got = await me.swarm.fetch("m", names, lambda i: False, net.from_coordinator)
        assert got == net.coordinator and net.coordinator_served == 0
        # tried by the requests in flight at first, then not again
        assert me.direct_fetches <= swarm_module.PEER_REQUESTS and me.swarm.bytes_from_peers_direct == 0
        assert me.swarm.bytes_from_peers == 4000 and not me.swarm.banned
        assert any("http://gone:1" in n for n in me.notices)

    run(main())
