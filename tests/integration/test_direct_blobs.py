"""The direct blob path (trainer --listen, server/net/blob_http.py): a trainer serves the blobs it holds over plain
HTTP, the coordinator passes each node its linked peers' blob URLs, and trainers fetch each other's chunks from there
instead of over data channels; the server answers nothing but held blobs, and the client reads nothing unbounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re

import pytest

from server.net import blob_http
from server.net.blob_http import BlobServer, DirectFetchError, ListenError, fetch_direct, parse_listen
from shared.manifest import MAX_BLOB_BYTES
from tests.integration.test_mesh import model_lines

HTTP_LINE = re.compile(r"round (\d+): model (?:fetched as|updated by a delta of) .*; (\d+) of the bytes from peers "
                       r"over HTTP")


async def raw(url: str, request: bytes) -> bytes:
    host, _, port = url[len("http://"):].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    answer = await reader.read()
    writer.close()
    return answer


def test_the_blob_server_serves_held_blobs_and_answers_anything_else_with_400_or_404(loopback_namespace):
    data = os.urandom(MAX_BLOB_BYTES)
    name = hashlib.sha256(data).hexdigest()

    async def main():
        server = BlobServer({name: memoryview(data)}.get)
        url = await server.start("127.0.0.1", 0)
        try:
            assert await fetch_direct(url, name) == data
            assert await fetch_direct(url, "0" * 64) is None  # not held: 404
            assert (await raw(url, f"GET /blobs/{name} HTTP/1.1\r\n\r\n".encode())).endswith(data)
            for request in (f"POST /blobs/{name} HTTP/1.1\r\n\r\n", "GET /blobs/../state.db HTTP/1.1\r\n\r\n",
                            "GET / HTTP/1.1\r\n\r\n", f"GET /blobs/{name.upper()} HTTP/1.1\r\n\r\n", "hello\r\n\r\n"):
                assert (await raw(url, request.encode())).startswith(b"HTTP/1.1 400 "), request
            too_long = b"GET /blobs/" + b"a" * blob_http.MAX_HEAD_BYTES + b" HTTP/1.1\r\n\r\n"
            assert await raw(url, too_long) == b""  # a head beyond the limit is not read: closed unanswered
        finally:
            await server.close()

    asyncio.run(main())


def test_the_client_reads_a_blob_url_as_untrusted(loopback_namespace):
    async def main():
        async def liar(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BLOB_BYTES + 1}\r\n\r\n".encode() + b"x" * 1000)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(liar, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            with pytest.raises(DirectFetchError, match="bad length"):  # more than a blob may be: not read at all
                await fetch_direct(url, "0" * 64)
            for bad in (url + "/elsewhere", url.replace("http", "https"), "http://user@127.0.0.1:1"):
                with pytest.raises(DirectFetchError):
                    await fetch_direct(bad, "0" * 64)
        finally:
            server.close()

    asyncio.run(main())
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0) and parse_listen("[::1]:8100") == ("::1", 8100)
    for bad in ("0.0.0.0:8100", "[::]:8100", "8100", "host:port", ":8100"):
        with pytest.raises(ListenError):
            parse_listen(bad)


def test_trainers_that_listen_fetch_chunks_from_each_other_over_http(processes, loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--rounds", "3", "--verify-share", "0",
                                        "--peers", "3", "--deadline-seconds", "120", "--delta-codec", "fp32")
    coordinator.wait_ready()
    trainers = [processes.trainer(coordinator.url, "--log-level", "INFO", "--listen", "127.0.0.1:0",
                                  peer_wait_seconds=300)
                for _ in range(3)]
    for t in trainers:
        assert t.wait(300) == 0, t.output()
    final = coordinator.wait_for(lambda s: s["state"] == "finished", 30, "the job to finish")
    history = final["history"]
    for t in trainers:
        log = t.output()
        assert re.search(r"serving held blobs to peers at http://127\.0\.0\.1:\d+/blobs/", log)
        over_http = {int(r): int(b) for r, b in HTTP_LINE.findall(log)}
        lines = model_lines(log)
        assert sorted(lines) == sorted(over_http) == [1, 2, 3]
        for r, (_, _, _, from_peers, _, model_hash) in lines.items():
            assert model_hash == history[r - 1]["model_hash"]  # the coordinator's model, whatever the path
            if r > 1:  # every node is in the round's advice, so it knows every peer's blob URL
                assert over_http[r] == from_peers, log[-3000:]
    assert sum(int(b) for t in trainers for _, b in HTTP_LINE.findall(t.output())) > 0  # chunks went over HTTP
    nodes = final["nodes"]
    assert sum(n["bytes_to_peers"] for n in nodes) > 0 and sum(n["bytes_from_peers"] for n in nodes) > 0
    assert [h["accepted"] for h in history] == [0, 3, 3, 3]
