"""A real TURN server for tests: Debian's coturn (`turnserver`) on loopback, with one long-term credential.

It listens and relays on 127.0.0.1 only and writes nothing outside the test's temporary directory (no config file,
its pid file, user database and log there). Never point it at anything but loopback: tests run in a loopback-only
network namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.processes import LoggedProcess

TURN_USER = "swarmgrad-node"
TURN_PASSWORD = "turn-secret-7f3a"  # distinctive, so a test can look for it where it must never appear
TURN_REALM = "swarmgrad"
READY_TIMEOUT_S = 30.0
STUN_MAGIC_COOKIE = 0x2112A442


def free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def stun_binding_answered(port: int) -> bool:
    """Whether a STUN Binding request to 127.0.0.1:port gets a success response (RFC 5389) within 0.25 s."""
    transaction = os.urandom(12)
    request = (0x0001).to_bytes(2, "big") + (0).to_bytes(2, "big") + STUN_MAGIC_COOKIE.to_bytes(4, "big") + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.25)
        try:
            s.sendto(request, ("127.0.0.1", port))
            answer = s.recv(2048)
        except OSError:  # a timeout, or "connection refused" before coturn listens
            return False
    return answer[:2] == (0x0101).to_bytes(2, "big") and answer[8:20] == transaction


class TurnServer(LoggedProcess):
    """coturn on 127.0.0.1:`port`; `url` is its turn: URL over UDP."""

    def __init__(self, workdir: Path):
        self.port = free_udp_and_tcp_port()
        self.url = f"turn:127.0.0.1:{self.port}?transport=udp"
        super().__init__(
            ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", "--allow-loopback-peers",
             "-p", str(self.port), "--lt-cred-mech", "--user", f"{TURN_USER}:{TURN_PASSWORD}", "--realm", TURN_REALM,
             "--no-tls", "--no-dtls", "--no-cli", "--log-file", "stdout", "--pidfile", str(workdir / "turnserver.pid"),
             "--userdb", str(workdir / "turndb.sqlite")],
            workdir / "turnserver.log")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stun_binding_answered(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"turnserver did not answer STUN on port {self.port}:\n{self.output()[-3000:]}")


def running_turn_server(tmp_path: Path, request):
    """The body of a test module's `turn_server` fixture: coturn on loopback for one test, its log printed when the
    test failed. Skips only where Debian's coturn is not installed (`./dev setup` installs it)."""
    if shutil.which("turnserver") is None:
        pytest.skip("coturn's turnserver is not installed; `./dev setup` (apt-get install coturn) installs it")
    workdir = tmp_path / "turn"
    workdir.mkdir()
    server = TurnServer(workdir)
    yield server
    server.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"==== turnserver.log\n{server.output()[-4000:]}")
