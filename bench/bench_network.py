"""The data plane at scale, star against mesh: server/sim/network.py's discrete-event model of each round's model
reaching N nodes over their links (the tracker's own advice, the node's own choices), at 10, 100 and 1,000 nodes.

Never assert a target here (tests/test_network.py holds the model's invariants); this prints what the model measured.

usage: python -m bench.bench_network [--nodes 10,100,1000] [--peers 4] [--rounds 3] [--model base] [--inner-steps 50]
       [--update-codec int8] [--churn 0] [--coordinator-mbit 1000] [--browser-port] [--seed 0] [--json]

Each size runs the star (--peers 0) and the mesh (--peers K) with the same seed, so the same nodes on the same links;
the figures are means over the rounds (steady state: every node holds the last model, unless --churn brings newcomers).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

from server.sim.network import MIX, NetworkOptions, RoundReport, run_network

COLUMNS = (("nodes", 6), ("links", 6), ("model s", 9), ("median", 7), ("round s", 8), ("egress MB", 11),
           ("deltas", 8), ("all MB", 10), ("all dl", 8), ("down MB", 8), ("up MB", 7), ("peers", 6),
           ("down>peers", 11), ("util br", 8), ("util tr", 8), ("t/o", 5), ("bans", 5))


def mean(reports: list[RoundReport], field: str) -> float:
    return sum(getattr(r, field) for r in reports) / len(reports)


def row(options: NetworkOptions, reports: list[RoundReport]) -> list[str]:
    util = {kind: sum(r.utilisation_by_kind.get(kind, 0.0) for r in reports) / len(reports)
            for kind in ("browser", "trainer")}
    return [f"{options.nodes}", f"{options.peers or 'star'}", f"{mean(reports, 'model_s'):.1f}",
            f"{mean(reports, 'model_s_median'):.1f}", f"{mean(reports, 'round_s'):.1f}",
            f"{mean(reports, 'coordinator_blob_bytes') / 1e6:,.1f}", f"{mean(reports, 'coordinator_deltas'):,.1f}",
            f"{mean(reports, 'coordinator_bytes') / 1e6:,.1f}", f"{mean(reports, 'coordinator_all_deltas'):,.1f}",
            f"{mean(reports, 'download_mean') / 1e6:.2f}",
            f"{mean(reports, 'upload_mean') / 1e6:.2f}", f"{mean(reports, 'peer_upload_mean') / 1e6:.2f}",
            f"{mean(reports, 'download_over_peer_upload'):.0%}", f"{util['browser']:.2f}", f"{util['trainer']:.2f}",
            f"{sum(r.timeouts for r in reports)}", f"{sum(r.bans for r in reports)}"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_network", description=__doc__.split("\n\n")[0])
    d = NetworkOptions()
    p.add_argument("--nodes", default="10,100,1000", help="comma-separated swarm sizes")
    p.add_argument("--peers", type=int, default=d.peers, help="the mesh's peer links per node (the star is 0)")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--model", default=d.model)
    p.add_argument("--inner-steps", type=int, default=d.inner_steps)
    p.add_argument("--update-codec", default=d.update_codec, help="the pseudo-gradients' codec: fp32, fp16, int8, topk")
    p.add_argument("--churn", type=float, default=d.churn, help="share of nodes replaced by newcomers each round")
    p.add_argument("--coordinator-mbit", type=float, default=d.coordinator_mbit)
    p.add_argument("--browser-port", action="store_true",
                   help="browsers apply deltas only as the standard-library port does (not base's: they fetch the "
                        "snapshot); by default every node applies them")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="also print every round's report as a JSON line")
    args = p.parse_args()
    started = time.perf_counter()
    base = NetworkOptions(rounds=args.rounds, model=args.model, inner_steps=args.inner_steps,
                          update_codec=args.update_codec, churn=args.churn, coordinator_mbit=args.coordinator_mbit,
                          browser_port=args.browser_port, seed=args.seed)
    print("mix: " + "; ".join(f"{c.name} {c.share:.0%} ({c.up_mbit:g}/{c.down_mbit:g} Mbit/s up/down, "
                              f"{c.latency_ms:g} ms, {c.step_s:g} s/step)" for c in MIX)
          + f"; coordinator {args.coordinator_mbit:g} Mbit/s each way")
    print(f"model {args.model}, H={args.inner_steps}, updates {args.update_codec}, churn {args.churn:g}, "
          f"{args.rounds} round(s), browsers apply deltas {'as their port does' if args.browser_port else 'always'}, "
          f"seed {args.seed}\n")
    print("".join(f"{name:>{width}}" for name, width in COLUMNS))
    for nodes in (int(n) for n in args.nodes.split(",")):
        results = {}
        for peers in (0, args.peers):
            options = replace(base, nodes=nodes, peers=peers)
            tick = time.perf_counter()
            results[peers] = reports = run_network(options)
            print("".join(f"{cell:>{width}}" for cell, (_, width) in zip(row(options, reports), COLUMNS))
                  + f"   ({time.perf_counter() - tick:.1f}s)", flush=True)
            if args.json:
                for r in reports:
                    print(json.dumps({"nodes": nodes, "peers": peers, **asdict(r)}), flush=True)
        star, mesh = results[0], results[args.peers]
        print(f"{'':>12}mesh/star: model time x{mean(mesh, 'model_s') / mean(star, 'model_s'):.2f}, "
              f"coordinator egress x{mean(mesh, 'coordinator_blob_bytes') / mean(star, 'coordinator_blob_bytes'):.3f}"
              f", round time x{mean(mesh, 'round_s') / mean(star, 'round_s'):.2f}", flush=True)
    print("\n(model s: until the last node holds the round's model, median: the median node; round s: until the "
          "last update is in; egress MB: the coordinator's model blobs (chunks and manifests), deltas: that in "
          "deltas' worth; all MB: with shards and control messages, all dl: that in deltas' worth; down MB: model "
          "bytes a node received; up MB: what it served to peers and its update; peers: what it served to peers; "
          "down>peers: nodes that received more than they served; util: compute / round time, browsers and "
          "trainers; t/o: peer links dropped for a request that timed out; bans: peers banned for a blob not asked "
          f"for)\n\n{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
