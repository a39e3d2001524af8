"""Utilisation over a WAN-like link: a coordinator and two trainers (real processes), the trainers reaching the
coordinator through a relay that delays every byte by half the round trip each way, on a loopback shaped with
`tc ... tbf` to a rate; against the same job on the bare loopback, in the same run; each link once without and once
with overlapped rounds (the coordinator's --overlap). Reports each node's utilisation as the coordinator shows it
(/api/status nodes[].utilisation: training time over wall time, its last rounds).

Never assert a target here; this prints what a run measured.

usage: python -m bench.bench_utilisation [--inner-steps 300] [--rounds 5] [--batch 8] [--rtt-ms 50]
                                         [--rate-mbit 100] [--logs DIR]

Run as root: outside a namespace it runs itself again in a loopback-only one (`unshare -n`), where `tc` may shape
`lo` (these kernels have no netem, hence the relay for the delay). Trainers use the WebSocket path through the relay
(`--transport websocket`), so their control frames, model blobs and updates all cross it; their peer data channels
(UDP on lo) are shaped but not delayed. Pick --inner-steps for rounds of about 30 s of compute on your machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import Coordinator, Process, free_port, only_loopback_interfaces

RELAY_CHUNK = 65_536  # bytes read at a time by the relay
JOB_TIMEOUT_S = 3600.0
RELAY_CLOSE_S = 5.0  # how long the relay's pipes get to end, beyond the delay, once it is told to stop


class DelayRelay:
    """A TCP relay on 127.0.0.1 that delivers every byte `delay` seconds after it arrived, each way, in order."""

    def __init__(self, upstream_port: int, delay: float):
        self.upstream_port, self.delay = upstream_port, delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.writers: set[asyncio.StreamWriter] = set()  # both ends of every link open through the relay

    def __enter__(self) -> DelayRelay:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:  # close the links still open (the trainers'): each pipe then reads its end and stops
            server.close()
            for writer in self.writers:
                writer.close()
            pipes = asyncio.all_tasks(self.loop)
            if pipes:
                self.loop.run_until_complete(asyncio.wait(pipes, timeout=self.delay + RELAY_CLOSE_S))
            self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        finally:
            self.writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(RELAY_CHUNK):
                queue.put_nowait((time.monotonic() + self.delay, data))
        finally:
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await sender


def shape_loopback(rate_mbit: float | None) -> None:
    """tbf on lo at `rate_mbit`, or no shaping (None)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate_mbit is not None:
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb",
                        "latency", "200ms"], check=True)


def run_job(args: argparse.Namespace, logs: Path, wan: bool, overlap: bool) -> tuple[list[float], float]:
    """One job of `args.rounds` rounds with two trainers: each node's utilisation at its end, and the final
    validation loss (what overlap's delayed outer step costs, next to what it buys)."""
    shape_loopback(args.rate_mbit if wan else None)
    name = f"{'wan' if wan else 'lo'}{'-overlap' if overlap else ''}"
    coordinator = Coordinator(logs, logs / f"data-{name}", "--inner-steps", str(args.inner_steps),
                              "--batch", str(args.batch), "--rounds", str(args.rounds), "--verify-share", "0",
                              "--deadline-seconds", "600", *(["--overlap"] if overlap else []))
    trainers: list[Process] = []
    try:
        coordinator.wait_ready(180)
        with DelayRelay(coordinator.port, args.rtt_ms / 2000 if wan else 0.0) as relay:
            for i in range(2):
                trainers.append(Process(["-m", "server", "trainer", "--coordinator", f"http://127.0.0.1:{relay.port}",
                                         "--transport", "websocket", "--no-progress"],
                                        logs / f"trainer-{name}-{i}.log"))
            status = coordinator.wait_for(lambda s: s["state"] == "finished", JOB_TIMEOUT_S, "the job's rounds")
    finally:
        for p in trainers + [coordinator]:
            p.stop()
        shape_loopback(None)
    return [n["utilisation"] for n in status["nodes"] if n["utilisation"] is not None], status["val_loss"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_utilisation", description=__doc__.split("\n\n")[0])
    p.add_argument("--inner-steps", type=int, default=300, help="H: pick it for about 30 s of compute a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here (default: a temp dir)")
    args = p.parse_args()
    if not only_loopback_interfaces():
        if os.geteuid() != 0:
            sys.exit("error: run as root (it shapes lo with tc in a network namespace of its own)")
        os.execvp("unshare", ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                              sys.executable, "-m", "bench.bench_utilisation", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="swarmgrad-util-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        # each link's two jobs back to back, so that the load of the machine is alike for both
        measured = {(wan, overlap): run_job(args, logs, wan, overlap)
                    for wan in (False, True) for overlap in (False, True)}
    print(f"H={args.inner_steps}, {args.rounds} rounds, 2 trainers; utilisation = training time / wall time, "
          "each node's last rounds")
    print(f"{'link':>32} {'overlap':>7} {'nodes':>14} {'mean':>6} {'val loss':>9}")
    links = {False: "loopback", True: f"{args.rate_mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT"}
    mean = {key: statistics.mean(u) for key, (u, _) in measured.items()}
    for (wan, overlap), (u, loss) in measured.items():
        print(f"{links[wan]:>32} {'on' if overlap else 'off':>7} {' '.join(f'{x:.3f}' for x in u):>14} "
              f"{mean[wan, overlap]:>6.3f} {loss:>9.4f}")
    for wan in (False, True):
        print(f"ratio (overlap on / off), {links[wan]}: {mean[wan, True] / mean[wan, False]:.3f}")
    for overlap in (False, True):
        print(f"ratio (WAN / loopback), overlap {'on' if overlap else 'off'}: "
              f"{mean[True, overlap] / mean[False, overlap]:.3f}")


if __name__ == "__main__":
    main()
