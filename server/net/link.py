"""A link to one peer: control messages and chunked payloads over a WebRTC data channel or a WebSocket.

Both paths carry the same frames (shared/wire.py), so the round logic never knows which one is in use.
Never send a frame over MAX_MESSAGE_BYTES, and never queue unboundedly: senders wait on the channel's buffer.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from shared.wire import FrameReceiver, Message, PayloadHeader, payload_frames

__all__ = ["DataChannelLink", "FrameReceiver", "Link", "LinkClosed", "WebSocketLink"]

SEND_BUFFER_HIGH = 1 << 20  # pause sending above this many queued bytes on a data channel
SEND_BUFFER_LOW = 256 * 1024


class LinkClosed(ConnectionError):
    """The peer's channel closed while sending."""


class Link:
    """Sends frames to one peer. `path` is "webrtc", "webrtc-relay" (through a TURN server) or "websocket", shown
    to users."""

    path = "?"

    def __init__(self) -> None:
        self._transfer_ids = itertools.count(1)
        self._send_lock = asyncio.Lock()  # one payload at a time, so chunks of two payloads never interleave
        self.bytes_sent = 0

    async def _send_text(self, text: str) -> None:
        raise NotImplementedError

    async def _send_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    @property
    def is_open(self) -> bool:
        raise NotImplementedError

    async def send_message(self, msg: Message) -> None:
        text = msg.encode()
        async with self._send_lock:
            await self._send_text(text)
        self.bytes_sent += len(text)

    async def send_frame(self, frame: str | bytes) -> None:
        """One frame as it is (a node sends its signed Update, header and chunks in order through this)."""
        async with self._send_lock:
            await (self._send_text(frame) if isinstance(frame, str) else self._send_bytes(frame))
        self.bytes_sent += len(frame)

    async def send_payload(self, kind: str, data: bytes | memoryview, meta: dict | None = None,
                           announce: Callable[[PayloadHeader], Message] | None = None) -> PayloadHeader:
        """Send a PayloadHeader and its chunks. `announce(header)` builds a message (e.g. the signed Update that
        names the transfer id and sha256) that goes just before them, with nothing in between."""
        header, chunks = payload_frames(next(self._transfer_ids) % (1 << 32), kind, data, meta)
        async with self._send_lock:
            if announce is not None:
                await self._send_text(announce(header).encode())
            await self._send_text(header.encode())
            for chunk in chunks:
                await self._send_bytes(chunk)
                self.bytes_sent += len(chunk)
        return header


class DataChannelLink(Link):
    path = "webrtc"

    def __init__(self, channel, path: str = "webrtc") -> None:  # an aiortc RTCDataChannel; server.net.rtc.link_path
        super().__init__()
        self.channel = channel
        self.path = path
        self._low = asyncio.Event()
        channel.bufferedAmountLowThreshold = SEND_BUFFER_LOW
        channel.on("bufferedamountlow", self._low.set)

    @property
    def is_open(self) -> bool:
        return self.channel.readyState == "open"

    async def _wait_for_room(self) -> None:
        while self.channel.bufferedAmount > SEND_BUFFER_HIGH:
            if not self.is_open:
                raise LinkClosed("data channel closed")
            self._low.clear()
            try:
                await asyncio.wait_for(self._low.wait(), 1.0)
            except asyncio.TimeoutError:
                pass  # re-check the state; a closed channel never fires bufferedamountlow

    async def _send_text(self, text: str) -> None:
        if not self.is_open:
            raise LinkClosed("data channel closed")
        await self._wait_for_room()
        self.channel.send(text)

    async def _send_bytes(self, data: bytes) -> None:
        if not self.is_open:
            raise LinkClosed("data channel closed")
        await self._wait_for_room()
        self.channel.send(data)


class WebSocketLink(Link):
    """The fallback path: frames over the signaling WebSocket, through two send callables."""

    path = "websocket"

    def __init__(self, send_text: Callable[[str], Awaitable[None]], send_bytes: Callable[[bytes], Awaitable[None]],
                 is_open: Callable[[], bool]) -> None:
        super().__init__()
        self._text, self._bytes, self._open = send_text, send_bytes, is_open

    @property
    def is_open(self) -> bool:
        return self._open()

    async def _send_text(self, text: str) -> None:
        try:
            await self._text(text)
        except Exception as e:  # the websocket libraries raise their own closed errors
            raise LinkClosed(f"websocket closed: {e}") from e

    async def _send_bytes(self, data: bytes) -> None:
        try:
            await self._bytes(data)
        except Exception as e:
            raise LinkClosed(f"websocket closed: {e}") from e
