"""The signaling WebSocket: signed hello, admission, SDP relay between any two peers, and the fallback path.

The coordinator is a peer too: an offer addressed to it is answered by an aiortc peer connection whose data
channel becomes the node's link. Never act on a message from a socket that has not proven its key, and never
let a peer's bad input cost more than one rate-limited log line: it gets a typed Error and a 1008 close.
"""

from __future__ import annotations

import asyncio
import logging

from aiortc import RTCSessionDescription
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server.net import rtc
from server.coordinator import Coordinator, NodeSession
from server.coordinator.intake import new_nonce
from server.keys import SignatureError, verify
from server.net.link import DataChannelLink, FrameReceiver, WebSocketLink
from server.log_limits import MEMBERSHIP_LINES_BURST, MEMBERSHIP_LINES_PER_SECOND, LogLimiter
from shared.identity import signing_bytes
from shared.wire import (Challenge, Error, Hello, IceCandidate, MalformedFrame, Message, PathSelect, Sdp, Welcome,
                         WireError, decode_message)

log = logging.getLogger("swarmgrad.signaling")

HELLO_TIMEOUT_S = 15.0
MAX_ERROR_TEXT = 300  # an Error's message: enough to say what was wrong, never a peer's 64 KB value echoed back
CLOSE_POLICY = 1008  # the WebSocket close code for input that breaks the protocol
CLOSE_INTERNAL = 1011  # ... and for a failure of our own while serving the peer


def fatal_error(code: str, message: str) -> Error:
    """The Error a peer gets before its connection closes, its text cut to MAX_ERROR_TEXT."""
    if len(message) > MAX_ERROR_TEXT:
        message = message[: MAX_ERROR_TEXT - 1] + "…"
    return Error(code, message, fatal=True)


def peer_address(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "?"


class SignalingServer:
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.sockets: dict[str, WebSocket] = {}  # node id -> its signaling socket, for relaying
        self.peer_connections: set = set()
        self.pc_by_node: dict = {}  # node id -> its aiortc peer connection with us
        self.peer_log = LogLimiter(log)  # every line a peer can cause goes through here ...
        self.membership_log = LogLimiter(log, MEMBERSHIP_LINES_PER_SECOND, MEMBERSHIP_LINES_BURST)  # ... or here

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
        except Exception:  # a bug of ours, not the peer's input (that is a WireError, answered where it is read)
            who = f"node {session.node_id[:12]}" if session is not None else peer_address(ws)
            self.peer_log.exception("error while serving the signaling socket of %s", who)
            await self._close(ws, fatal_error("internal", "the coordinator failed while serving this connection"),
                              CLOSE_INTERNAL)
        finally:
            if session is not None:
                current = self.sockets.get(session.node_id) is ws  # not replaced by a newer connection
                self._forget(ws, session)
                if current:
                    pc = self.pc_by_node.pop(session.node_id, None)
                    if pc is not None:
                        await pc.close()
                self.membership_log.info("node %s left", session.node_id[:12])

    async def _disconnect(self, ws: WebSocket, session: NodeSession) -> None:
        """Close every link of a node the coordinator removed: its data channel and its signaling socket."""
        pc = self.pc_by_node.pop(session.node_id, None) if self.sockets.get(session.node_id) is ws else None
        if pc is not None:
            await pc.close()
        if ws.application_state == WebSocketState.CONNECTED:
            try:
                await ws.close(code=CLOSE_POLICY)
            except (WebSocketDisconnect, OSError, RuntimeError):  # already gone
                pass

    def _forget(self, ws: WebSocket, session: NodeSession) -> None:
        """Undo the handshake's registration, unless a newer connection of the same node replaced it."""
        self.coordinator.detach(session)
        if self.sockets.get(session.node_id) is ws:
            del self.sockets[session.node_id]

    async def _fail(self, ws: WebSocket, code: str, message: str) -> None:
        """Refuse the peer: one (rate-limited) warning, then a fatal Error and a 1008 close."""
        self.peer_log.warning("closing the signaling socket of %s: [%s] %s", peer_address(ws), code,
                              message[:MAX_ERROR_TEXT])
        await self._close(ws, fatal_error(code, message), CLOSE_POLICY)

    async def _close(self, ws: WebSocket, error: Error, close_code: int) -> None:
        if ws.application_state == WebSocketState.CONNECTED:
            try:
                await ws.send_text(error.encode())
                await ws.close(code=close_code)
            except (WebSocketDisconnect, OSError, RuntimeError):  # the peer is already gone: nothing to tell it
                pass

    async def _handshake(self, ws: WebSocket) -> NodeSession | None:
        """Challenge, signed hello, admission, then the node's registration and its Welcome; None once the peer
        is refused (with a fatal Error and a 1008 close) or gone. Every check that can refuse the node comes
        before the registration, so a refused hello leaves nothing behind."""
        nonce = new_nonce()
        await ws.send_text(Challenge(nonce, self.coordinator.key.node_id).encode())
        try:
            frame = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._fail(ws, "timeout", f"no hello within {HELLO_TIMEOUT_S:.0f}s")
            return None
        if frame["type"] == "websocket.disconnect":
            return None
        try:
            if frame.get("text") is None:
                raise MalformedFrame(f"expected a hello in a text frame, got a binary frame of "
                                     f"{len(frame.get('bytes') or b'')} bytes")
            hello = decode_message(frame["text"])
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
        refusal = self.coordinator.admit(hello.node_id, hello.kind, ws.client.host if ws.client else "")
        if refusal is not None:
            await self._fail(ws, refusal.code, refusal.reason)
            return None
        welcome = Welcome(hello.node_id, self.coordinator.key.node_id, self.coordinator.describe(credentials=True),
                          self.coordinator.round).encode()
        old = self.sockets.get(hello.node_id)
        if old is not None:
            await self._fail(old, "replaced", "this node connected again from elsewhere")
        session = NodeSession(hello.node_id, hello.kind, hello.agent, blob_url=hello.blob_url, name=hello.name,
                              team=hello.team)
        session.disconnect = lambda: self._disconnect(ws, session)
        try:
            self.sockets[hello.node_id] = ws
            self.coordinator.attach(session)
            await ws.send_text(welcome)
        except BaseException:  # the peer left, or the store failed: nothing of this session may stay
            self._forget(ws, session)
            raise
        self.membership_log.info("node %s joined (%s, %r)", hello.node_id[:12], hello.kind, hello.agent or "-")
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
            self.membership_log.info("node %s uses the websocket fallback", session.node_id[:12])
            await self.coordinator.node_ready(session)

    async def _route_signal(self, ws: WebSocket, session: NodeSession, msg: Sdp | IceCandidate) -> None:
        relayed = type(msg)(**{**msg.__dict__, "src": session.node_id})  # the sender cannot forge src
        if msg.dst == self.coordinator.key.node_id:
            if isinstance(msg, Sdp) and msg.sdp_type == "offer":
                await self._answer(ws, session, msg)
            return  # candidates ride inside our SDP; trickled ones are not needed by aiortc
        target = self.sockets.get(msg.dst)
        if target is not None:
            try:
                await target.send_text(relayed.encode())
                return
            except WebSocketDisconnect:  # the target is leaving; that is no fault of the sender's
                pass
        await ws.send_text(Error("no_peer", f"peer {msg.dst[:12]}… is not connected").encode())

    async def _answer(self, ws: WebSocket, session: NodeSession, offer: Sdp) -> None:
        pc = rtc.new_peer_connection(rtc.rtc_ice_servers(list(self.coordinator.ice_servers)))
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
                path = rtc.link_path(pc)  # ICE nominated its pair before the channel could open
                session.link = DataChannelLink(channel, path)
                self.membership_log.info("node %s data channel open (%s)", session.node_id[:12], path)
                await coordinator.node_ready(session)

            async def on_frame(frame) -> bool:
                """Handle one frame; False when it broke the protocol and the channel is closed."""
                try:
                    item = receiver.feed(frame)
                except WireError as e:
                    self.peer_log.warning("closing the data channel of node %s: [%s] %s", session.node_id[:12],
                                          e.code, str(e)[:MAX_ERROR_TEXT])
                    if channel.readyState == "open":
                        channel.send(fatal_error(e.code, str(e)).encode())
                    channel.close()
                    return False
                if isinstance(item, tuple):
                    await coordinator.on_payload(session, *item)
                elif isinstance(item, Message):
                    await coordinator.on_message(session, item)
                return True

            # aiortc calls handlers synchronously; one consumer task per channel keeps frames in order
            frames: asyncio.Queue = asyncio.Queue()
            channel.on("message", frames.put_nowait)

            async def consume() -> None:
                while channel.readyState in ("connecting", "open") or not frames.empty():
                    frame = await frames.get()
                    if frame is None:
                        return
                    try:
                        if not await on_frame(frame):
                            return
                    except Exception:  # a bug of ours; the peer's bad input is a WireError, handled in on_frame
                        self.peer_log.exception("error while handling a frame from node %s", session.node_id[:12])

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
