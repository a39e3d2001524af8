"""Robustness and compression from simulated swarms: each aggregator under each attack against the clean mean,
and each codec's bytes per round against fp32's, all with one seed, in one run.

Never assert a target here (tests/test_simulate.py holds the claims); this prints what a run measured.

usage: python -m bench.bench_simulate [--workers 12] [--byzantine 0.34] [--rounds 8] [--inner-steps 5]
       [--batch 8] [--lr 1e-3] [--corpus-bytes 3000000] [--seed 0] [--attacks signflip,noise,scale,alie]
       [--aggregators mean,median,...]
       [--codecs fp32 fp16 int8 int8:deflate=false topk topk:deflate=false sparseloco] [--json]

Every run is `server.sim.run_simulation` (the real coordinator, real codecs and rules) with the same seed,
so the honest workers see the same batches in every run; only the attackers, the rule and the codec change.
A ratio is final validation loss / the clean mean run's; bytes are what the coordinator recorded per round.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from server.aggregation import RULES
from server.sim import ATTACKS, SimOptions, run_simulation

DEFAULT_CODECS = ["fp32", "fp16", "int8:deflate=false", "int8", "topk:deflate=false", "topk", "sparseloco"]
"""Every codec as a job names it (int8 and topk deflate by default), and without deflate, to see what it adds."""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--byzantine", type=float, default=0.34, help="share of attackers (0.34 of 12 is 4)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--batch", "--batch", dest="batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="inner AdamW lr (1e-3: still learning at the end)")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000,
                   help="3 MB of the stdlib source: Python only, before the unicode code-page tables")
    p.add_argument("--outer-momentum", type=float, default=SimOptions().outer_momentum)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--aggregators", default=",".join(RULES))
    p.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, metavar="CODEC",
                   help="codec options, as the coordinator's --codec takes them")
    p.add_argument("--json", action="store_true", help="also print every run's summary as JSON lines")
    args = p.parse_args()
    logging.getLogger("swarmgrad").setLevel(logging.ERROR)  # rejections are counted in the table instead
    base = dict(workers=args.workers, rounds=args.rounds, inner_steps=args.inner_steps, batch=args.batch,
                lr=args.lr, outer_momentum=args.outer_momentum, seed=args.seed, corpus_bytes=args.corpus_bytes,
                out=None)
    started = time.perf_counter()

    def run(**kw) -> dict:
        summary = run_simulation(SimOptions(**base, **kw)).summary
        if args.json:
            print(json.dumps({k: v for k, v in summary.items() if k != "options"} | kw), flush=True)
        return summary

    clean = run(aggregator="mean")
    clean_loss = clean["final_val_loss"]
    attackers = SimOptions(**base, byzantine=args.byzantine).attackers
    print(f"{args.workers} workers ({attackers} attackers), {args.rounds} rounds, H={args.inner_steps}, "
          f"batch {args.batch}, seed {args.seed}, {clean['params']:,} parameters")
    print(f"clean mean: final validation loss {clean_loss:.4f} (from {clean['initial_val_loss']:.4f})\n")
    aggregators = args.aggregators.split(",")
    print(f"{'attack':<10}" + "".join(f"{a:>18}" for a in aggregators))
    for attack in args.attacks.split(","):
        cells = []
        for aggregator in aggregators:
            s = run(aggregator=aggregator, byzantine=args.byzantine, attack=attack)
            note = f" r{s['rejected']}" if s["rejected"] else ""
            cells.append(f"{s['final_val_loss']:.3f} x{s['final_val_loss'] / clean_loss:.2f}{note}")
        print(f"{attack:<10}" + "".join(f"{c:>18}" for c in cells), flush=True)
    print("\n(cells: final validation loss, x ratio to the clean mean run, rN = N updates rejected by the rules)\n")
    width = max(6, *(len(c) + 1 for c in args.codecs))
    print(f"{'codec':<{width}}{'bytes/round':>14}{'bytes/update':>14}{'fp32/codec':>12}{'final loss':>12}{'vs fp32':>9}")
    fp32 = clean  # the clean run is the mean over fp32
    for codec in args.codecs:
        s = clean if codec == "fp32" else run(aggregator="mean", codec=codec)
        print(f"{codec:<{width}}{s['bytes_per_round']:>14,.0f}{s['bytes_per_update']:>14,.0f}"
              f"{fp32['bytes_per_round'] / s['bytes_per_round']:>11.2f}x{s['final_val_loss']:>12.4f}"
              f"{s['final_val_loss'] / fp32['final_val_loss'] - 1:>+9.2%}", flush=True)
    print(f"\n{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
