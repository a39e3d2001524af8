"""How fast a node gets the round's model, and how many bytes: in-band over its WebRTC data channel (aiortc), the
path every model took before; as the snapshot's content-addressed chunks over HTTP (GET /api/blobs); and, when it
holds the last round's model, as that round's int8 delta. Same coordinator, same run.

usage: python -m bench.bench_model_fetch [--model base] [--repeat 2]    (run it in a loopback-only netns)

It starts a real coordinator process and, in this process, real nodes (shared/node.py with the trainer's own
port) that join it one after another, each for one round. A node's fetch time runs from its assignment's arrival
to its model held and checked. Sends nothing beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from server.keys import NodeKey
from server.net import rtc
from server.trainer import Progress, TorchPort
from shared.node import Node
from tests.conftest import Coordinator


class TimedPort(TorchPort):
    """The trainer's port, timing its model fetch; `blobs=False` makes it a node that cannot reach blobs."""

    def __init__(self, coordinator_url: str, blobs: bool):
        ws = coordinator_url.replace("http://", "ws://") + "/ws"
        super().__init__(ws, NodeKey(), torch.device("cpu"), coordinator_url, Progress(False))
        self.blobs, self.assigned, self.fetched = blobs, None, []

    async def fetch_blob(self, name: str) -> bytes | None:
        return await super().fetch_blob(name) if self.blobs else None

    def report(self, event: str, **fields) -> None:
        if event == "round":
            self.assigned = time.perf_counter()
        elif event == "model":
            self.fetched.append((time.perf_counter() - self.assigned, fields["source"], fields["bytes"]))


async def fetch(url: str, blobs: bool, rounds: int) -> list[tuple[float, str, int]]:
    """The model fetches of a node that joins for `rounds` rounds: (seconds, source, bytes) each."""
    port = TimedPort(url, blobs)
    node = Node(port, port.key.node_id, transport="webrtc", max_rounds=rounds)
    ended = await asyncio.wait_for(node.run(), 600)
    if len(port.fetched) != rounds:
        raise RuntimeError(f"the node fetched {len(port.fetched)} models in {rounds} rounds ({ended})")
    return port.fetched


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_model_fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="model size (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="fetches per path (default: %(default)s)")
    args = p.parse_args(argv)
    rtc.restrict_ice_hosts(["127.0.0.1"])
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        coordinator = Coordinator(Path(tmp), Path(tmp) / "data", "--model", args.model, "--inner-steps", "1",
                                  "--batch", "4", "--deadline-seconds", "600", "--verify-share", "0")
        try:
            coordinator.wait_ready(120)
            times: dict[str, list[float]] = {"link": [], "blobs": [], "delta": []}
            sizes: dict[str, int] = {}
            for _ in range(args.repeat):
                # in-band, one round; then blobs for two rounds: the snapshot, then the delta from it
                for blobs, rounds in ((False, 1), (True, 2)):
                    for seconds, source, size in asyncio.run(fetch(coordinator.url, blobs, rounds)):
                        times[source].append(seconds)
                        sizes[source] = size
                        print(f"  {source:5s} {size / 1e6:6.2f} MB in {seconds:6.2f} s", flush=True)
            history = coordinator.status()["history"]
        finally:
            coordinator.stop()
    link, blobs, delta = (statistics.median(times[k]) for k in ("link", "blobs", "delta"))
    print(f"model {args.model}, median of {args.repeat}:")
    print(f"  in-band over aiortc   {sizes['link'] / 1e6:7.2f} MB  {link:6.2f} s   (the baseline)")
    print(f"  snapshot as blobs     {sizes['blobs'] / 1e6:7.2f} MB  {blobs:6.2f} s   x{link / blobs:.1f} faster")
    print(f"  int8 delta as blobs   {sizes['delta'] / 1e6:7.2f} MB  {delta:6.2f} s   x{link / delta:.1f} faster, "
          f"x{sizes['link'] / sizes['delta']:.1f} fewer bytes")
    print("  coordinator bytes out per round (MB): " + ", ".join(f"{h['coordinator_bytes_out'] / 1e6:.1f}"
                                                             for h in history[1:]))

if __name__ == "__main__":
    main()
