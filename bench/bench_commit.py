"""The commit's critical path: seconds from a round's last update to the next round's opening, with the round's
scores, validation loss, checkpoint and books settling in the background (today) against committing them first
(the old path), for each model size, in one run.

Never assert a target here; this prints what a run measured.

usage: python -m bench.bench_commit [--models small base] [--workers 4] [--rounds 4] [--inner-steps 1] [--batch 4]

Every run is `server.sim.run_simulation` (the real coordinator and nodes, in one process) with the same seed; only
`background_settle` changes. The first round's turnaround is left out (it compiles and warms caches).
"""

from __future__ import annotations

import argparse
import logging
import statistics

from server.sim import SimOptions, run_simulation


def turnaround(model: str, background: bool, args: argparse.Namespace) -> tuple[float, int]:
    """The median seconds from the last update to the next opening, and the parameter count."""
    summary = run_simulation(SimOptions(model=model, workers=args.workers, rounds=args.rounds,
                                        inner_steps=args.inner_steps, batch=args.batch, out=None, threads=args.threads,
                                        background_settle=background, verify_share=0.0)).summary
    seconds = summary["turnaround_seconds"][1:] or summary["turnaround_seconds"]
    return statistics.median(seconds), summary["params"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_commit", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["small", "base"])
    p.add_argument("--workers", type=int, default=4, help="updates per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.getLogger("swarmgrad").setLevel(logging.ERROR)
    print(f"{'model':>8} {'params':>11} {'commit first (s)':>17} {'settle behind (s)':>18} {'ratio':>7}")
    for model in args.models:
        before, params = turnaround(model, False, args)
        after, _ = turnaround(model, True, args)
        print(f"{model:>8} {params:>11,} {before:>17.3f} {after:>18.3f} {before / max(after, 1e-9):>6.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
