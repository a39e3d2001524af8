"""Shared fixtures: real coordinator and trainer processes on loopback, and the network-namespace guard."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures: one PostgreSQL server a session
from tests.processes import LoggedProcess

if TYPE_CHECKING:  # the store's package imports torch: not for every test session's start
    from server.coordinator.store import Store

ROOT = Path(__file__).resolve().parent.parent


def only_loopback_interfaces() -> bool:
    """True inside a loopback-only network namespace (what `./dev test` runs the suite in)."""
    return {name for _, name in socket.if_nameindex()} <= {"lo"}  # this process's namespace, unlike /sys


@pytest.fixture(scope="session")
def device():
    """A native WebGPU device (wgpu-py; lavapipe in CI) for the WGSL kernel tests."""
    from kernels.device import DeviceError

    try:
        from kernels.device_wgpu import WgpuDevice

        return WgpuDevice()
    except DeviceError as exc:
        pytest.fail(f"the kernel tests need a WebGPU adapter (Debian's mesa-vulkan-drivers in CI): {exc}")


@pytest.fixture
def loopback_namespace():
    """WebRTC tests gather ICE candidates; they must run where no interface but `lo` exists."""
    if not only_loopback_interfaces():
        pytest.fail("this test opens WebRTC connections and must run in a loopback-only network namespace: "
                    "run it through `./dev test` (or `unshare -n sh -c 'ip link set lo up && pytest ...'`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process(LoggedProcess):
    """A Python child process (`python ARGS` from the repository root, unbuffered) whose output goes to a log file,
    shown when a test fails."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        super().__init__([sys.executable, *args], log_path, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                         cwd=ROOT)


class Coordinator(Process):
    def __init__(self, tmp: Path, data_dir: Path, *extra: str, port: int | None = None, store: str | None = None,
                 env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.store = store  # a postgresql:// URL, or None: SQLite in the data directory
        super().__init__(["-m", "server", "--port", str(self.port), "--data-dir", str(data_dir),
                          *(["--store", store] if store else []), *extra],
                         tmp / f"coordinator-{self.port}-{time.monotonic_ns()}.log", env)

    @property
    def store_location(self) -> str | Path:
        """Its store: the postgresql:// URL, or the SQLite file in its data directory."""
        return self.store or self.data_dir / "state.db"

    def store_options(self) -> list[str]:
        """What a `python -m server ledger ...` command needs to find this coordinator's data and state."""
        return ["--data-dir", str(self.data_dir), *(["--store", self.store] if self.store else [])]

    @contextmanager
    def read_store(self) -> Iterator[Store]:
        """Its state as an auditor reads it, from whichever database it keeps it in: read-only, through the Store's
        own queries (so that one test reads SQLite and PostgreSQL alike), perhaps while it runs."""
        from server.coordinator.store import open_store

        store = open_store(self.store_location, read_only=True)
        try:
            yield store
        finally:
            store.close()

    def status(self) -> dict:
        return self.status_of("/api/status")

    def status_of(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.load(r)

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return self.status()
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"coordinator not ready after {timeout}s:\n{self.output()}")

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        status = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; last status {status}\n{self.output()[-4000:]}")


# `python -c` program: `python -m server ARGS`, with a sleep before every optimizer step of this process (a global
# torch hook: it slows the trainer's own steps and changes none of their numbers, so spot checks still reproduce)
SLOW_STEPS = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_pre_hook
register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep({seconds!r}))
from server.cli import main
sys.exit(main())
"""


# `python -c` program: `python -m server ARGS` whose mesh waits this long on peers before it asks the coordinator for a
# chunk (shared/swarm.py PEER_WAIT_S): a test that asserts chunks came from peers cannot then see a slow machine's
# fallback instead
PATIENT_PEERS = """
import sys
import shared.swarm
shared.swarm.PEER_WAIT_S = {seconds!r}
from server.cli import main
sys.exit(main())
"""


STORES = ["sqlite", "postgresql"]  # the databases a coordinator's state is tested on


def new_store_url(database: str, request) -> str | None:
    """None for SQLite (the coordinator's data directory), else a fresh PostgreSQL database's URL."""
    return None if database == "sqlite" else request.getfixturevalue("postgres_server").new_database()


@pytest.fixture(params=STORES)
def store_url(request) -> str | None:
    """Where a test's coordinator keeps its state, once per database: None (SQLite, in its data directory) or a
    fresh PostgreSQL database's URL. Pass it to processes.coordinator(store=...)."""
    return new_store_url(request.param, request)


@pytest.fixture(scope="module", params=STORES)
def module_store_url(request) -> str | None:
    """store_url for a coordinator that a whole module shares: the module runs once per database."""
    return new_store_url(request.param, request)


@pytest.fixture
def processes(tmp_path, request):
    """Start processes through this; all are stopped after the test, and their logs printed if it failed."""
    started: list[Process] = []

    class Factory:
        def coordinator(self, *extra: str, data_dir: Path | None = None, port: int | None = None,
                        store: str | None = None, env: dict | None = None) -> Coordinator:
            """A `python -m server` coordinator; `store` keeps its state in PostgreSQL (a postgresql:// URL)."""
            c = Coordinator(tmp_path, data_dir or tmp_path / "data", *extra, port=port, store=store, env=env)
            started.append(c)
            return c

        def trainer(self, coordinator_url: str, *extra: str, progress: bool = False,
                    min_step_seconds: float = 0.0, env: dict | None = None, program: str | None = None,
                    peer_wait_seconds: float | None = None) -> Process:
            """A `python -m server trainer`. progress keeps its per-round lines (loss, H, balance) in its log;
            min_step_seconds makes every optimizer step of this process take at least that long (a sleep before
            each step), so that a test can have a slow node by construction, on a machine of any speed. `program`
            runs the trainer through a `python -c` program instead (one that changes a behaviour, then calls
            server.cli.main), for a hostile node; peer_wait_seconds sets how long its mesh waits on peers before
            it asks the coordinator (so that a test of what peers delivered holds on a machine of any speed)."""
            args = ["trainer", "--coordinator", coordinator_url, *([] if progress else ["--no-progress"]), *extra]
            if program is not None:
                args = ["-c", program, *args]
            elif peer_wait_seconds is not None:
                args = ["-c", PATIENT_PEERS.format(seconds=float(peer_wait_seconds)), *args]
            elif min_step_seconds > 0:
                args = ["-c", SLOW_STEPS.format(seconds=float(min_step_seconds)), *args]
            else:
                args = ["-m", "server", *args]
            p = Process(args, tmp_path / f"trainer-{len(started)}.log", env)
            started.append(p)
            return p

    yield Factory()
    for p in started:
        p.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for p in started:
            print(f"==== {p.log_path.name}\n{p.output()[-6000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
