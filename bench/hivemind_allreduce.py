"""hivemind's DecentralizedAverager all-reducing float32 values among N peers on 127.0.0.1, timed: the baseline that
bench_dataplane.py sets beside swarmgrad's round overhead. Never imports the project: it runs in hivemind's own venv.

usage: <hivemind venv>/bin/python bench/hivemind_allreduce.py --peers 4 --values 10903680 [--repeat 2]
Prints progress on stderr and one JSON object on stdout. Run it in a loopback-only network namespace: its DHTs
listen on 127.0.0.1 only and know no bootstrap peer but each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
MATCHMAKING_S = 5.0  # hivemind's default min_matchmaking_time
GROUP_TIMEOUT_S = 120.0  # to find the group; the all-reduce itself gets ALLREDUCE_TIMEOUT_S
ALLREDUCE_TIMEOUT_S = 300.0
MAX_ABS_ERROR = 1e-4  # an averaged value further than this from the true mean means the all-reduce went wrong


def progress(text: str) -> None:
    print(f"    [hivemind] {text}", file=sys.stderr, flush=True)


def wait_for_stage(controls, stage: AveragingStage, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(c.stage == stage or c.done() for c in controls):
        if time.monotonic() > deadline:
            raise TimeoutError(f"peers still at {[c.stage.name for c in controls]} after {timeout:g} s")
        time.sleep(0.01)
    for c in controls:
        if c.done():
            c.result()  # re-raises why a peer's step ended before the all-reduce


def measure(peers: int, values: int, repeat: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(values, generator=generator) for _ in range(peers)]
    expected = torch.stack(inputs).mean(0)
    t0 = time.perf_counter()
    first = DHT(start=True, host_maddrs=[LOOPBACK_MADDR])
    dhts = [first] + [DHT(start=True, host_maddrs=[LOOPBACK_MADDR], initial_peers=first.get_visible_maddrs())
                      for _ in range(peers - 1)]
    averagers = [DecentralizedAverager([x.clone()], dht, start=True, prefix="bench_dataplane",
                                       target_group_size=peers, min_group_size=peers,
                                       min_matchmaking_time=MATCHMAKING_S, request_timeout=3.0,
                                       allreduce_timeout=ALLREDUCE_TIMEOUT_S) for x, dht in zip(inputs, dhts)]
    setup = time.perf_counter() - t0
    progress(f"{peers} DHTs and averagers up in {setup:.1f} s")
    rounds = []
    try:
        for r in range(repeat):
            for averager, x in zip(averagers, inputs):  # every repeat averages the same inputs
                with averager.get_tensors() as tensors:
                    tensors[0].copy_(x)
            started = time.perf_counter()
            controls = [a.step(wait=False, require_trigger=True, timeout=GROUP_TIMEOUT_S) for a in averagers]
            wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER, GROUP_TIMEOUT_S + 10)
            triggered = time.perf_counter()
            for c in controls:
                c.allow_allreduce()
            groups = [c.result(timeout=ALLREDUCE_TIMEOUT_S + 10) for c in controls]
            finished = time.perf_counter()
            if any(g is None or len(g) != peers for g in groups):
                raise RuntimeError(f"groups of {[None if g is None else len(g) for g in groups]} peers, not {peers}")
            error = 0.0
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    error = max(error, float((tensors[0] - expected).abs().max()))
            if error > MAX_ABS_ERROR:
                raise RuntimeError(f"an averaged value is {error:.3g} off the mean: the all-reduce did not average")
            rounds.append({"matchmaking_s": triggered - started, "allreduce_s": finished - triggered,
                           "max_abs_error": error})
            progress(f"repeat {r + 1}/{repeat}: matchmaking {triggered - started:.2f} s, "
                     f"all-reduce {finished - triggered:.2f} s (max error {error:.2g})")
    finally:
        for a in averagers:
            a.shutdown()
        for d in dhts:
            d.shutdown()
    return {"peers": peers, "values": values, "bytes_per_peer": values * 4, "setup_s": setup, "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--values", type=int, required=True, help="float32 values each peer holds")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.peers < 2 or args.values < 1 or args.repeat < 1:
        p.error("needs --peers >= 2, --values >= 1 and --repeat >= 1")
    torch.set_num_threads(1)
    print(json.dumps(measure(args.peers, args.values, args.repeat, args.seed)), flush=True)


if __name__ == "__main__":
    main()
