"""A real PostgreSQL server for tests: Debian's `postgresql` (initdb into a temporary directory), listening on
127.0.0.1 only with its socket in that directory, one fresh database per test (`postgres_url`).

It writes nothing outside its temporary directory and runs as an unprivileged user (initdb refuses root). Never
point it at anything but loopback: tests run in a loopback-only network namespace.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.processes import LoggedProcess

SUPERUSER = "swarmgrad"
UNPRIVILEGED_USER = "nobody"  # who initdb and postgres run as when the tests run as root
READY_TIMEOUT_S = 60.0
INITDB_TIMEOUT_S = 120.0


def postgres_bin_dir() -> Path | None:
    """Debian's versioned bin directory of the newest PostgreSQL installed (initdb is not on PATH there)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer(LoggedProcess):
    """postgres on 127.0.0.1:`port`, trusting local connections of `SUPERUSER` (a throwaway server). Unless
    `durable`, it never syncs to disk (for tests); a benchmark that compares commit latency wants it durable."""

    def __init__(self, workdir: Path, bin_dir: Path, durable: bool = False):
        self.workdir = workdir
        self.port = free_tcp_port()
        self.log_path = workdir / "postgres.log"
        self._databases = 0
        as_user: list[str] = []
        if os.getuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(workdir, user.pw_uid, user.pw_gid)
            as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(workdir / "data"), "-U", SUPERUSER,
                        "--auth=trust", "--no-sync", "--no-locale", "--encoding=UTF8", "--no-instructions"],
                       check=True, capture_output=True, timeout=INITDB_TIMEOUT_S)
        # fsync off in tests: what is under test is the coordinator's transactions surviving the coordinator's
        # death, not this throwaway server surviving the machine's
        # SIGINT is postgres's "fast" shutdown; SIGTERM's "smart" one waits on clients
        super().__init__(
            [*as_user, str(bin_dir / "postgres"), "-D", str(workdir / "data"), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(workdir), *([] if durable else ["-c", "fsync=off"])],
            self.log_path, stop_signal=signal.SIGINT, stop_grace=30.0)
        self._wait_ready()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not accept connections on port {self.port}:\n"
                                       f"{self.output()[-3000:]}") from None
                time.sleep(0.1)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session. Skips only where Debian's postgresql is not installed (`./dev setup`
    installs it)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed; `./dev setup` (apt-get install postgresql) installs it")
    workdir = Path(tempfile.mkdtemp(prefix="swarmgrad-postgres-"))
    try:
        server = PostgresServer(workdir, bin_dir)
        yield server
        server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for this test: its postgresql:// URL."""
    return postgres_server.new_database()
