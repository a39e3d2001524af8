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
from server.net.link import DataChannelLink, Link, LinkClosed, WebSocketLink
from shared.node import Disconnected, Node, NodePort
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
    """The link half of a Python node's port. `ws_url` is the coordinator's /ws endpoint."""

    transient = (OSError, websockets.exceptions.WebSocketException, LinkClosed)

    def __init__(self, ws_url: str, key) -> None:
        super().__init__(key)
        self.ws_url = ws_url
        self.ws = None
        self.pc = None
        self.link: Link | None = None
        self._reader: asyncio.Task | None = None
        self._opened = asyncio.Event()

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
        self.pc = rtc.new_peer_connection()
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

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        self.ws = self.pc = self.link = self._reader = None
