"""How fast a node gets the round's model: as content-addressed chunks over HTTP (GET /api/blobs, the default), and
in-band over its WebRTC data channel (aiortc), the path every model took before. Same coordinator, same run.

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
        self.blobs, self.assigned, self.fetched = blobs, None, None

    async def fetch_blob(self, name: str) -> bytes | None:
        return await super().fetch_blob(name) if self.blobs else None

    def report(self, event: str, **fields) -> None:
        if event == "round" and self.assigned is None:
            self.assigned = time.perf_counter()
        elif event == "model" and self.fetched is None:
            self.fetched = (time.perf_counter() - self.assigned, fields["source"], fields["bytes"])


async def fetch_once(url: str, blobs: bool) -> tuple[float, str, int]:
    port = TimedPort(url, blobs)
    node = Node(port, port.key.node_id, transport="webrtc", max_rounds=1)
    ended = await asyncio.wait_for(node.run(), 600)
    if port.fetched is None:
        raise RuntimeError(f"the node fetched no model ({ended})")
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
            times: dict[str, list[float]] = {"link": [], "blobs": []}
            size = 0
            for _ in range(args.repeat):
                for blobs in (False, True):
                    seconds, source, size = asyncio.run(fetch_once(coordinator.url, blobs))
                    times[source].append(seconds)
                    print(f"  {source:5s} {size / 1e6:6.1f} MB in {seconds:6.2f} s ({size / seconds / 1e6:7.1f} MB/s)",
                          flush=True)
        finally:
            coordinator.stop()
    link, blobs = statistics.median(times["link"]), statistics.median(times["blobs"])
    print(f"model {args.model} ({size / 1e6:.1f} MB): in-band over aiortc {link:.2f} s, as HTTP blobs {blobs:.2f} s "
          f"(median of {args.repeat}); blobs are x{link / blobs:.1f} faster")


if __name__ == "__main__":
    main()
