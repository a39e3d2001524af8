"""The signaling WebSocket: signed hello, admission, SDP relay between any two peers, and the fallback path.

The coordinator is a peer too: an offer addressed to it is answered by an aiortc peer connection whose data
channel becomes the node's link. Never act on a message from a socket that has not proven its key.
"""

from __future__ import annotations

import asyncio
import logging

from aiortc import RTCSessionDescription
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server import rtc
from server.coordinator import Coordinator, NodeSession, new_nonce
from server.keys import SignatureError, verify
from server.link import DataChannelLink, FrameReceiver, WebSocketLink
from shared.identity import signing_bytes
from shared.wire import (Challenge, Error, Hello, IceCandidate, Message, PathSelect, Sdp, Welcome, WireError,
                         decode_message)

log = logging.getLogger("swarmgrad.signaling")

HELLO_TIMEOUT_S = 15.0


class SignalingServer:
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.sockets: dict[str, WebSocket] = {}  # node id -> its signaling socket, for relaying
        self.peer_connections: set = set()
        self.pc_by_node: dict = {}  # node id -> its aiortc peer connection with us

    @property
    def max_payload(self) -> int:
        return self.coordinator.max_payload

    async def close(self) -> None:
        await asyncio.gather(*(pc.close() for pc in list(self.peer_connections)), return_exceptions=True)

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        session = None
        try:
            session = await self._handshake(ws)
            if session is not None:
                await self._serve(ws, session)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                self.coordinator.detach(session)
                if self.sockets.get(session.node_id) is ws:  # not replaced by a newer connection
                    del self.sockets[session.node_id]
                    pc = self.pc_by_node.pop(session.node_id, None)
                    if pc is not None:
                        await pc.close()
                log.info("node %s left", session.node_id[:12])

    async def _fail(self, ws: WebSocket, code: str, message: str) -> None:
        log.warning("closing a signaling socket: [%s] %s", code, message)
        if ws.application_state == WebSocketState.CONNECTED:
            try:
                await ws.send_text(Error(code, message, fatal=True).encode())
                await ws.close(code=1008)
            except Exception:  # the peer may already be gone; nothing left to tell it
                pass

    async def _handshake(self, ws: WebSocket) -> NodeSession | None:
        nonce = new_nonce()
        await ws.send_text(Challenge(nonce, self.coordinator.key.node_id).encode())
        try:
            text = await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT_S)
            hello = decode_message(text)
        except asyncio.TimeoutError:
            await self._fail(ws, "timeout", f"no hello within {HELLO_TIMEOUT_S:.0f}s")
            return None
        except WireError as e:
            await self._fail(ws, e.code, str(e))
            return None
        if not isinstance(hello, Hello):
            await self._fail(ws, "protocol", f"expected hello, got {hello.TYPE}")
            return None
        if hello.nonce != nonce:
            await self._fail(ws, "auth", "hello signs a different challenge")
            return None
        try:
            verify(hello.node_id, signing_bytes("hello", hello.signing_fields()), hello.signature)
        except SignatureError as e:
            await self._fail(ws, "auth", str(e))
            return None
        refusal = self.coordinator.admit(hello.node_id, hello.kind)
        if refusal is not None:
            await self._fail(ws, "admission", refusal)
            return None
        old = self.sockets.get(hello.node_id)
        if old is not None:
            await self._fail(old, "replaced", "this node connected again from elsewhere")
        self.sockets[hello.node_id] = ws
        session = NodeSession(hello.node_id, hello.kind, hello.agent)
        self.coordinator.attach(session)
        await ws.send_text(Welcome(hello.node_id, self.coordinator.key.node_id, self.coordinator.describe(),
                                   self.coordinator.round).encode())
        log.info("node %s joined (%s, %s)", hello.node_id[:12], hello.kind, hello.agent or "-")
        return session

    async def _serve(self, ws: WebSocket, session: NodeSession) -> None:
        receiver = FrameReceiver(self.max_payload)
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            data = frame.get("text") if frame.get("text") is not None else frame.get("bytes")
            if data is None:
                continue
            try:
                item = receiver.feed(data)
            except WireError as e:
                await self._fail(ws, e.code, str(e))
                return
            if item is None:
                continue
            if isinstance(item, tuple):
                await self.coordinator.on_payload(session, *item)
            elif isinstance(item, (Sdp, IceCandidate)):
                await self._route_signal(ws, session, item)
            elif isinstance(item, PathSelect):
                await self._select_path(ws, session, item.path)
            else:
                await self.coordinator.on_message(session, item)

    async def _select_path(self, ws: WebSocket, session: NodeSession, path: str) -> None:
        if path == "websocket":
            session.link = WebSocketLink(ws.send_text, ws.send_bytes,
                                         lambda: ws.application_state == WebSocketState.CONNECTED)
            log.info("node %s uses the websocket fallback", session.node_id[:12])
            await self.coordinator.node_ready(session)

    async def _route_signal(self, ws: WebSocket, session: NodeSession, msg: Sdp | IceCandidate) -> None:
        relayed = type(msg)(**{**msg.__dict__, "src": session.node_id})  # the sender cannot forge src
        if msg.dst == self.coordinator.key.node_id:
            if isinstance(msg, Sdp) and msg.sdp_type == "offer":
                await self._answer(ws, session, msg)
            return  # candidates ride inside our SDP; trickled ones are not needed by aiortc
        target = self.sockets.get(msg.dst)
        if target is None:
            await ws.send_text(Error("no_peer", f"peer {msg.dst[:12]}… is not connected").encode())
            return
        await target.send_text(relayed.encode())

    async def _answer(self, ws: WebSocket, session: NodeSession, offer: Sdp) -> None:
        pc = rtc.new_peer_connection()
        self.peer_connections.add(pc)
        previous = self.pc_by_node.pop(session.node_id, None)
        if previous is not None:
            await previous.close()
        self.pc_by_node[session.node_id] = pc
        receiver = FrameReceiver(self.max_payload)
        coordinator = self.coordinator

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.peer_connections.discard(pc)
                if isinstance(session.link, DataChannelLink) and session.link.channel in channels:
                    coordinator.detach(session)
                await pc.close()

        channels: list = []

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            channels.append(channel)

            async def opened() -> None:
                session.link = DataChannelLink(channel)
                log.info("node %s data channel open", session.node_id[:12])
                await coordinator.node_ready(session)

            async def on_frame(frame) -> None:
                try:
                    item = receiver.feed(frame)
                except WireError as e:
                    log.warning("bad frame from %s: [%s] %s; closing its channel", session.node_id[:12], e.code, e)
                    try:
                        channel.send(Error(e.code, str(e), fatal=True).encode())
                    finally:
                        channel.close()
                    return
                if isinstance(item, tuple):
                    await coordinator.on_payload(session, *item)
                elif isinstance(item, Message):
                    await coordinator.on_message(session, item)

            # aiortc calls handlers synchronously; one consumer task per channel keeps frames in order
            frames: asyncio.Queue = asyncio.Queue()
            channel.on("message", frames.put_nowait)

            async def consume() -> None:
                while channel.readyState in ("connecting", "open") or not frames.empty():
                    frame = await frames.get()
                    if frame is None:
                        return
                    try:
                        await on_frame(frame)
                    except Exception:
                        log.exception("error while handling a frame from %s", session.node_id[:12])

            consumers.append(asyncio.ensure_future(consume()))

            @channel.on("close")
            def on_close() -> None:
                frames.put_nowait(None)
                if isinstance(session.link, DataChannelLink) and session.link.channel is channel:
                    coordinator.detach(session)

            if channel.readyState == "open":
                asyncio.ensure_future(opened())
            else:
                channel.on("open", lambda: asyncio.ensure_future(opened()))

        consumers: list[asyncio.Future] = []  # keep references so the tasks are not collected
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = Sdp(self.coordinator.key.node_id, session.node_id, "answer", pc.localDescription.sdp)
        await ws.send_text(answer.encode())
