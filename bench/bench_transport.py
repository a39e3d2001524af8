"""Data-channel throughput of aiortc peer to peer, against a plain WebSocket (Starlette/uvicorn) moving the same bytes.

It must never contact an address other than 127.0.0.1: it refuses to send if an SDP offers any other ICE candidate.

usage: python -m bench.bench_transport [--mb 32]

Both transports run in one process on one asyncio loop (sender and receiver side by side), so each gets the
same CPU budget and the ratio compares the stacks, not the scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from aiortc import RTCDataChannel
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as websocket_connect

from server.net.rtc import new_peer_connection, restrict_ice_hosts
from shared.wire import MAX_MESSAGE_BYTES  # the largest data-channel message both browsers and aiortc accept

LOOPBACK = "127.0.0.1"
HEADER = struct.Struct("!Q")  # a sequence number, so the receiver checks that nothing is lost or reordered
PAYLOAD_BYTES = MAX_MESSAGE_BYTES - HEADER.size
# Back-pressure on the data channel: stop queueing above HIGH_WATER, resume at the bufferedamountlow event.
HIGH_WATER_BYTES = 4 * 1024 * 1024
LOW_WATER_BYTES = 1 * 1024 * 1024
CONNECT_TIMEOUT_S = 20.0


class NotLoopbackError(RuntimeError):
    """An SDP offered an ICE candidate on an address other than 127.0.0.1; the bench refuses to send."""


class TransferError(RuntimeError):
    """A receiver saw a message out of order or of the wrong size."""


@dataclass(frozen=True)
class Throughput:
    transport: str
    messages: int
    bytes_moved: int
    seconds: float
    setup_seconds: float
    detail: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e6


def message(seq: int, payload: bytes) -> bytes:
    return HEADER.pack(seq) + payload


class Receiver:
    """Counts messages, checks their order and size, and resolves `done` with the time the last one arrived."""

    def __init__(self, expected_messages: int):
        self.expected_messages = expected_messages
        self.received = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_message(self, data: bytes | str) -> None:
        if self.done.done():
            return
        if not isinstance(data, bytes) or len(data) != MAX_MESSAGE_BYTES:
            size = len(data) if isinstance(data, bytes) else f"text of {len(data)} chars"
            self.done.set_exception(TransferError(f"message {self.received}: expected {MAX_MESSAGE_BYTES} bytes, got {size}"))
            return
        (seq,) = HEADER.unpack_from(data)
        if seq != self.received:
            self.done.set_exception(TransferError(f"expected message {self.received}, got {seq}: lost or reordered"))
            return
        self.received += 1
        if self.received == self.expected_messages:
            self.done.set_result(time.perf_counter())


# ---------------------------------------------------------------- aiortc


def candidate_addresses(sdp: str) -> list[str]:
    """The connection address of every `a=candidate:` line (the fifth field of the candidate attribute)."""
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def require_loopback_only(sdp: str, who: str) -> None:
    addresses = candidate_addresses(sdp)
    if not addresses:
        raise NotLoopbackError(f"the {who} has no ICE candidates; expected host candidates on {LOOPBACK}")
    others = sorted({a for a in addresses if a != LOOPBACK})
    if others:
        raise NotLoopbackError(
            f"the {who} offers ICE candidates on {', '.join(others)}; this bench may only use {LOOPBACK}. "
            "Check that server.net.rtc.restrict_ice_hosts([\"127.0.0.1\"]) ran before the peer connections were made."
        )


async def send_with_backpressure(channel: RTCDataChannel, messages: int, make: Callable[[int], bytes]) -> float:
    """Queue `messages` messages, pausing while more than HIGH_WATER_BYTES wait; returns the first send's time."""
    low = asyncio.Event()
    channel.bufferedAmountLowThreshold = LOW_WATER_BYTES
    channel.on("bufferedamountlow", low.set)
    started = time.perf_counter()
    for seq in range(messages):
        if channel.bufferedAmount > HIGH_WATER_BYTES:
            low.clear()
            await low.wait()
        channel.send(make(seq))
    return started


async def measure_aiortc(messages: int, payload: bytes) -> Throughput:
    restrict_ice_hosts([LOOPBACK])
    t0 = time.perf_counter()
    offerer, answerer = new_peer_connection(), new_peer_connection()
    try:
        loop = asyncio.get_running_loop()
        receiver = Receiver(messages)
        channel = offerer.createDataChannel("bench", ordered=True)
        opened: asyncio.Future[None] = loop.create_future()
        channel.on("open", lambda: opened.done() or opened.set_result(None))
        remote_ready: asyncio.Future[None] = loop.create_future()

        @answerer.on("datachannel")
        def on_datachannel(remote: RTCDataChannel) -> None:
            remote.on("message", receiver.on_message)
            remote_ready.set_result(None)

        # Each description is checked before the other side sees it, so no peer ever dials a non-loopback address.
        await offerer.setLocalDescription(await offerer.createOffer())
        require_loopback_only(offerer.localDescription.sdp, "offer")
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        require_loopback_only(answerer.localDescription.sdp, "answer")
        candidates = candidate_addresses(offerer.localDescription.sdp) + candidate_addresses(answerer.localDescription.sdp)
        await offerer.setRemoteDescription(answerer.localDescription)
        try:
            await asyncio.wait_for(asyncio.gather(opened, remote_ready), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise TransferError(f"the data channel did not open within {CONNECT_TIMEOUT_S:g} s on {LOOPBACK}") from None
        setup = time.perf_counter() - t0

        started = await send_with_backpressure(channel, messages, lambda seq: message(seq, payload))
        finished = await receiver.done
        detail = f"ICE candidates in offer and answer: {', '.join(candidates)}"
        return Throughput("aiortc data channel", messages, messages * MAX_MESSAGE_BYTES, finished - started, setup, detail)
    finally:
        await offerer.close()
        await answerer.close()


# ---------------------------------------------------------------- WebSocket baseline


def websocket_app(receiver: Receiver) -> Starlette:
    """One route, /sink, that feeds every binary message to `receiver` and answers "done" at the end."""

    async def sink(ws: WebSocket) -> None:
        await ws.accept()
        while not receiver.done.done():
            receiver.on_message(await ws.receive_bytes())
        await ws.send_text("done")
        await ws.close()

    return Starlette(routes=[WebSocketRoute("/sink", sink)])


async def measure_websocket(messages: int, payload: bytes) -> Throughput:
    receiver = Receiver(messages)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        websocket_app(receiver),
        log_level="warning",
        lifespan="off",
        ws_max_size=MAX_MESSAGE_BYTES,
        ws_per_message_deflate=False,  # the data channel does not compress either
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # re-raises why the server failed to start
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        async with websocket_connect(
            f"ws://{LOOPBACK}:{port}/sink", max_size=MAX_MESSAGE_BYTES, compression=None, open_timeout=CONNECT_TIMEOUT_S
        ) as ws:
            setup = time.perf_counter() - t0
            started = time.perf_counter()
            for seq in range(messages):
                await ws.send(message(seq, payload))  # waits while the transport's write buffer is full
            finished = await receiver.done
            if (reply := await ws.recv()) != "done":
                raise TransferError(f"the WebSocket sink answered {reply!r}, expected 'done'")
        return Throughput("WebSocket (uvicorn)", messages, messages * MAX_MESSAGE_BYTES, finished - started, setup)
    finally:
        server.should_exit = True
        await serving
        sock.close()


# ---------------------------------------------------------------- main


async def run(megabytes: float, seed: int) -> tuple[Throughput, Throughput]:
    messages = max(1, round(megabytes * 1e6 / MAX_MESSAGE_BYTES))
    payload = random.Random(seed).randbytes(PAYLOAD_BYTES)  # incompressible, like a float32 update
    baseline = await measure_websocket(messages, payload)
    rtc = await measure_aiortc(messages, payload)
    return baseline, rtc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_transport", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32.0, help="megabytes (1e6 bytes) to move over each transport")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random payload")
    args = parser.parse_args(argv)
    if args.mb <= 0:
        parser.error("--mb must be positive")

    baseline, rtc = asyncio.run(run(args.mb, args.seed))
    print(f"{args.mb:g} MB on {LOOPBACK} in messages of {MAX_MESSAGE_BYTES} bytes ({HEADER.size}-byte header), one process")
    for result in (baseline, rtc):
        print(
            f"  {result.transport:<22} {result.mb_per_s:8.2f} MB/s  "
            f"({result.bytes_moved / 1e6:.1f} MB in {result.seconds:.2f} s; setup {result.setup_seconds * 1e3:.0f} ms)"
        )
        if result.detail:
            print(f"    {result.detail}")
    print(f"  ratio aiortc / WebSocket: {rtc.mb_per_s / baseline.mb_per_s:.3f}")


if __name__ == "__main__":
    main()
