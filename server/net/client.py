"""A Python node's links to the coordinator: the signaling WebSocket, and a WebRTC data channel (aiortc) or the
WebSocket fallback. shared/node.py drives them through the NodePort methods implemented here.

Never deliver a frame anywhere but to the node's feed: the node checks every frame before it acts on it.
"""

from __future__ import annotations

import asyncio
import logging

import websockets
import websockets.exceptions

from server.keys import SignatureError, verify
from server.net import rtc
from server.net.blob_http import fetch_direct
from server.net.link import DataChannelLink, Link, LinkClosed, WebSocketLink
from shared.model import GPTConfig
from shared.node import Disconnected, Node, NodePort, Refused
from shared.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("swarmgrad.client")

CONNECT_TIMEOUT_S = 10.0


class KeyedPort(NodePort):
    """A Python node's identity: it signs with its NodeKey and verifies with server.keys."""

    def __init__(self, key) -> None:
        self.key = key

    async def sign(self, data: bytes) -> str:
        return self.key.sign(data)

    async def verify(self, public_key: str, data: bytes, signature: str) -> bool:
        try:
            verify(public_key, data, signature)
            return True
        except SignatureError:
            return False


class ClientLinks(KeyedPort):
    """The link half of a Python node's port. `ws_url` is the coordinator's /ws endpoint. `ice_servers` are the
    job's STUN/TURN servers (aiortc RTCIceServer), for every peer connection this node makes."""

    transient = (OSError, websockets.exceptions.WebSocketException, LinkClosed)

    def __init__(self, ws_url: str, key) -> None:
        super().__init__(key)
        self.ws_url = ws_url
        self.ws = None
        self.pc = None
        self.link: Link | None = None
        self.ice_servers: tuple = ()
        self._reader: asyncio.Task | None = None
        self._opened = asyncio.Event()
        self.peer_pcs: dict = {}  # peer node id -> its aiortc peer connection
        self.peer_links: dict[str, DataChannelLink] = {}  # peer node id -> its open data channel

    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        """Take the job's ICE servers; a driver that overrides prepare calls this first."""
        try:
            self.ice_servers = rtc.rtc_ice_servers(job.get("ice_servers"))
        except ValueError as e:
            raise Refused(f"the coordinator's ICE servers cannot be used: {e}") from None
        turn = [u for s in self.ice_servers for u in s.urls if rtc.is_turn_url(u)]
        if rtc.relay_required() and not turn:
            log.warning("relay-only ICE (--ice-relay-only), but the coordinator names no TURN server: no data "
                        "channel can open")

    async def connect(self, node: Node) -> None:
        self.node = node
        self.ws = await websockets.connect(self.ws_url, max_size=2 * MAX_MESSAGE_BYTES, open_timeout=CONNECT_TIMEOUT_S)
        self._reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws) -> None:
        try:
            async for frame in ws:
                self.node.feed("signaling", frame)
        except websockets.exceptions.ConnectionClosed:
            pass
        if self.ws is ws:  # not a socket of an earlier session
            self.node.lost("signaling socket", "closed")

    async def send_signal(self, text: str) -> None:
        await self.ws.send(text)

    async def create_offer(self) -> str:
        self.pc = rtc.new_peer_connection(self.ice_servers)
        channel = self.pc.createDataChannel("swarmgrad", ordered=True)
        self._opened = asyncio.Event()
        channel.on("open", self._opened.set)
        link = self.link = DataChannelLink(channel)
        channel.on("message", lambda frame: self.link is link and self.node.feed("webrtc", frame))
        channel.on("close", lambda: self.link is link and self.node.lost("data channel", "closed"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str, timeout: float) -> bool:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        try:
            await asyncio.wait_for(self._opened.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def use_fallback(self) -> None:
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
        ws = self.ws
        self.link = WebSocketLink(ws.send, ws.send, lambda: ws.state.name == "OPEN")

    async def send(self, frame: str | bytes) -> None:
        if self.link is None:
            raise Disconnected("no link to the coordinator")
        await self.link.send_frame(frame)

    # -- peer links (shared/swarm.py): an aiortc data channel to another node, signalled through the coordinator

    def _peer_connection(self, peer: str):
        old = self.peer_pcs.pop(peer, None)
        if old is not None:
            asyncio.ensure_future(old.close())
        pc = self.peer_pcs[peer] = rtc.new_peer_connection(self.ice_servers)
        node = self.node

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.peer_pcs.get(peer) is pc:
                del self.peer_pcs[peer]
                self.peer_links.pop(peer, None)
                node.peer_lost(peer, pc.connectionState)
                await pc.close()

        return pc

    def _peer_channel(self, peer: str, pc, channel) -> None:
        link = DataChannelLink(channel)

        def opened() -> None:
            if self.peer_pcs.get(peer) is pc:
                self.peer_links[peer] = link
                self.node.peer_opened(peer)

        def closed() -> None:
            if self.peer_links.get(peer) is link:
                del self.peer_links[peer]
                self.node.peer_lost(peer, "channel closed")

        channel.on("message", lambda frame: self.peer_links.get(peer) is link and self.node.peer_frame(peer, frame))
        channel.on("close", closed)
        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    async def peer_offer(self, peer: str) -> str:
        pc = self._peer_connection(peer)
        self._peer_channel(peer, pc, pc.createDataChannel("swarmgrad-peer", ordered=True))
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def peer_answer(self, peer: str, offer: str) -> str:
        from aiortc import RTCSessionDescription

        pc = self._peer_connection(peer)
        pc.on("datachannel", lambda channel: self._peer_channel(peer, pc, channel))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def peer_accept(self, peer: str, answer: str) -> None:
        from aiortc import RTCSessionDescription

        pc = self.peer_pcs.get(peer)
        if pc is not None and pc.signalingState == "have-local-offer":
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def peer_send(self, peer: str, frame: str | bytes) -> None:
        link = self.peer_links.get(peer)
        if link is None:
            raise LinkClosed(f"no open link to peer {peer[:12]}")
        await link.send_frame(frame)

    async def peer_close(self, peer: str) -> None:
        self.peer_links.pop(peer, None)
        pc = self.peer_pcs.pop(peer, None)
        if pc is not None:
            await pc.close()

    async def peer_fetch(self, url: str, name: str) -> bytes | None:
        """Straight from a peer's blob server over HTTP (server/net/blob_http.py), where the tracker names one."""
        return await fetch_direct(url, name)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.pc is not None:
            await self.pc.close()
        for peer in list(self.peer_pcs):
            await self.peer_close(peer)
        if self.ws is not None:
            await self.ws.close()
        self.ws = self.pc = self.link = self._reader = None
