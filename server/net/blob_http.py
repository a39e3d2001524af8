"""A Python node's direct blob path (trainer --listen): the blobs its swarm holds, served read-only over plain HTTP at
GET /blobs/{sha256}, and the client that fetches them from another node's blob URL instead of over a data channel.

Serve nothing but held blobs (200, 404 when not held, 400 for anything else), and read no more than the limits
below from either side: the URL came from another node through the coordinator, so it is untrusted, and every byte
fetched is checked against its name by the swarm (shared/swarm.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable

from shared.manifest import MAX_BLOB_BYTES
from shared.wire import WireError, check_blob_url

MAX_HEAD_BYTES = 8_192  # a request's or a response's line and headers
HEAD_TIMEOUT_S = 10.0  # to read a request's head; a client that dawdles is closed
SEND_TIMEOUT_S = 60.0  # to send one blob to a client that reads slowly
MAX_CONNECTIONS = 64  # open at once (16 peer links x 2 requests in flight is 32); beyond, a connection closes at once
CONNECT_TIMEOUT_S = 5.0  # the client's; the swarm bounds a whole request with PEER_REQUEST_TIMEOUT_S
READ_LIMIT = 1 << 16  # asyncio stream buffer: large enough that a 256 KiB blob streams without stalling

REQUEST = re.compile(rb"GET /blobs/([^ ]*) HTTP/1\.[01]\r\n")
NAME = re.compile(r"[0-9a-f]{64}")
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d{1,10}) *\r\n", re.I)
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


class ListenError(ValueError):
    """A --listen address that no other node could use."""


class DirectFetchError(OSError):
    """A blob URL that did not answer as a blob server does."""


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from `HOST:PORT` (`[IPv6]:PORT` too). PORT 0 picks a free port. The host is announced to peers
    as it is, so it must be an address they reach: not a wildcard such as 0.0.0.0."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ListenError(f"--listen takes HOST:PORT, like 10.0.0.5:8100 (PORT 0 picks one); got {text!r}")
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        wildcard = False
    if wildcard:
        raise ListenError(f"--listen {text}: the host is told to peers, so give an address they reach, not a wildcard")
    return host, int(port)


def blob_url(host: str, port: int) -> str:
    """The URL peers are told (Hello.blob_url) for a server on (host, port); ListenError when the wire refuses it."""
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        check_blob_url(url)
    except WireError as e:
        raise ListenError(f"{url} cannot be announced: {e}") from None
    return url


class BlobServer:
    """Serves `held(name)` (the swarm's serve_direct: a held blob's bytes, or None) at GET /blobs/{name}."""

    def __init__(self, held: Callable[[str], bytes | memoryview | None]):
        self.held = held
        self.server: asyncio.Server | None = None
        self.url = ""
        self.connections = 0

    async def start(self, host: str, port: int) -> str:
        """Listen on (host, port); the URL to announce (with the port picked, when port is 0)."""
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD_BYTES)
        self.url = blob_url(host, self.server.sockets[0].getsockname()[1])
        return self.url

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections <= MAX_CONNECTIONS:
                await self._answer(reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, dawdled or sent a head beyond MAX_HEAD_BYTES: nothing to answer
        finally:
            self.connections -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        request = REQUEST.match(head)
        name = request[1].decode("ascii", "replace") if request else ""
        if not NAME.fullmatch(name):
            status, body = 400, b"GET /blobs/{sha256} is all this serves\n"
        else:
            data = self.held(name)
            status, body = (404, b"not held\n") if data is None else (200, data)
        extra = f'Cache-Control: public, max-age=31536000, immutable\r\nETag: "{name}"\r\n' if status == 200 else ""
        writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode())
        writer.write(body)
        await asyncio.wait_for(writer.drain(), SEND_TIMEOUT_S)


async def fetch_direct(url: str, name: str) -> bytes | None:
    """Blob `name` from the blob server at `url` (http://HOST:PORT, checked again here): its bytes, unchecked
    against the name (the caller does that), at most MAX_BLOB_BYTES; None when it answers 404. DirectFetchError
    (or OSError) when the URL is not a blob URL, cannot be reached or answers anything else."""
    try:
        check_blob_url(url)
    except WireError as e:
        raise DirectFetchError(str(e)) from None
    if not NAME.fullmatch(name):
        raise DirectFetchError(f"{name!r} is not a blob name")
    host, _, port = url[len("http://"):].rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port), limit=READ_LIMIT),
                                            CONNECT_TIMEOUT_S)
    try:
        writer.write(f"GET /blobs/{name} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise DirectFetchError(f"no HTTP response head within {READ_LIMIT} bytes") from e
        if len(head) > MAX_HEAD_BYTES or not (status := STATUS.match(head)):
            raise DirectFetchError("the answer is not an HTTP response")
        if status[1] == b"404":
            return None
        length = CONTENT_LENGTH.search(head)
        if status[1] != b"200" or length is None or not 0 < int(length[1]) <= MAX_BLOB_BYTES:
            raise DirectFetchError(f"HTTP {status[1].decode()} with {'no' if length is None else 'a bad'} length")
        try:
            return await reader.readexactly(int(length[1]))
        except asyncio.IncompleteReadError as e:
            raise DirectFetchError(f"the blob ended after {len(e.partial)} bytes") from e
    finally:
        writer.close()
