"""The outer step against H and the number of workers: final validation loss and bounce for each outer learning rate
and momentum, from simulated swarms (the real coordinator's round logic, server/sim) on one token budget.

Never compare configurations that saw different data: within a cell (workers, H) every outer step trains the same
tokens, and one seed gives every run the same worker keys, so the same shards and the same first round's batches.

usage: python -m bench.bench_outer_step [--workers 2,8] [--inner-steps 5,20,50] [--outer-lr 0.3,0.5,0.7,1.0]
       [--outer-momentum 0,0.5,0.9] [--steps-per-worker 300] [--seeds 0] [--jobs 2] [--results FILE.jsonl]

Each run is `server.sim.run_simulation` with steps-per-worker / H rounds, so every worker of every run takes the
same number of inner steps (tokens = workers x steps x batch x seq_len). Bounce is the largest rise of validation
loss from one round to the next (0 when it fell every round). Runs are appended to --results as they end, and a
second call with the same file runs only what is missing, then prints the table from every stored run.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
from pathlib import Path

from server.sim import SimOptions, run_simulation

# 3 MB of the stdlib source: Python only, before the unicode code-page tables (as tests/test_simulate.py)
CORPUS_BYTES = 3_000_000


def bounce(losses: list[float]) -> float:
    """The largest rise of validation loss between consecutive rounds; 0 when it never rose."""
    return max([0.0] + [b - a for a, b in zip(losses, losses[1:])])


def run_one(config: dict) -> dict:
    """One simulated job; returns the config with its losses, final loss and bounce."""
    logging.getLogger("swarmgrad").setLevel(logging.ERROR)
    o = SimOptions(workers=config["workers"], inner_steps=config["inner_steps"],
                   rounds=config["steps_per_worker"] // config["inner_steps"], outer_lr=config["outer_lr"],
                   outer_momentum=config["outer_momentum"], seed=config["seed"], batch=config["batch"],
                   lr=config["lr"], corpus_bytes=CORPUS_BYTES, peers=0, out=None)  # the star: same bits, less work
    result = run_simulation(o)
    losses = [r["val_loss"] for r in result.rows]
    return {**config, "rounds": o.rounds, "tokens": result.summary["tokens_trained"], "val_loss": losses,
            "final_val_loss": losses[-1], "bounce": bounce(losses)}


def key(c: dict) -> tuple:
    return (c["workers"], c["inner_steps"], c["outer_lr"], c["outer_momentum"], c["seed"], c["steps_per_worker"],
            c["batch"], c["lr"])


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def table(runs: list[dict], lrs: list[float], moms: list[float]) -> str:
    """A markdown table: one row per outer step; per cell (workers, H, steps per worker) the mean final loss over
    the seeds and the largest bounce of any seed; then the mean, over the cells it ran in, of its final loss over
    the cell's best, and its mean rank in those cells."""
    cells = sorted({(r["workers"], r["inner_steps"], r["steps_per_worker"]) for r in runs})
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["workers"], r["inner_steps"], r["steps_per_worker"], r["outer_lr"], r["outer_momentum"]),
                      []).append(r)
    finals = {k: statistics.mean(r["final_val_loss"] for r in v) for k, v in by.items()}
    excess: dict[tuple, list[float]] = {}
    ranks: dict[tuple, list[int]] = {}
    for cell in cells:
        here = sorted((finals[(*cell, lr, m)], lr, m) for lr in lrs for m in moms if (*cell, lr, m) in finals)
        for i, (loss, lr, m) in enumerate(here, start=1):
            excess.setdefault((lr, m), []).append(loss / here[0][0] - 1)
            ranks.setdefault((lr, m), []).append(i)
    head = ("| outer lr | momentum | " + " | ".join(f"W={w} H={h}" for w, h, _ in cells)
            + " | over the cell's best | mean rank |")
    lines = [head, "|" + "---|" * (len(cells) + 4)]
    for lr in lrs:
        for m in moms:
            if (lr, m) not in ranks:
                continue
            row = []
            for cell in cells:
                v = by.get((*cell, lr, m))
                row.append("" if not v else f"{finals[(*cell, lr, m)]:.3f} / {max(r['bounce'] for r in v):.3f}")
            lines.append(f"| {lr:g} | {m:g} | " + " | ".join(row) + f" | {statistics.mean(excess[(lr, m)]):+.1%} "
                         f"| {statistics.mean(ranks[(lr, m)]):.1f} |")
    seeds = sorted({r["seed"] for r in runs})
    budgets = ", ".join(f"W={w} H={h}: {p} steps a worker ({p // h} rounds)" for w, h, p in cells)
    return "\n".join(lines) + (f"\n\n(cells: final validation loss, mean over seeds {seeds} / the largest rise between "
                               f"two rounds of any seed; {budgets})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_outer_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=ints, default=[2, 8])
    p.add_argument("--inner-steps", type=ints, default=[5, 20, 50], help="H values")
    p.add_argument("--outer-lr", type=floats, default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--outer-momentum", type=floats, default=[0.0, 0.5, 0.9])
    p.add_argument("--steps-per-worker", type=int, default=300, help="inner steps each worker takes in a run")
    p.add_argument("--batch", type=int, default=SimOptions().batch)
    p.add_argument("--lr", type=float, default=SimOptions().lr, help="inner AdamW learning rate")
    p.add_argument("--seeds", type=ints, default=[0])
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process and one torch thread each")
    p.add_argument("--results", type=Path, default=Path("swarmgrad-outer-step.jsonl"))
    p.add_argument("--table-only", action="store_true",
                   help="run nothing; print the table of every stored run of these settings, any steps per worker")
    args = p.parse_args(argv)
    for h in args.inner_steps:
        if args.steps_per_worker % h:
            p.error(f"--steps-per-worker {args.steps_per_worker} is not a whole number of rounds of H={h}")
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[key(r)] = r
    todo = [dict(workers=w, inner_steps=h, outer_lr=lr, outer_momentum=m, seed=s, steps_per_worker=args.steps_per_worker,
                 batch=args.batch, lr=args.lr)
            for s in args.seeds for w in args.workers for h in args.inner_steps for lr in args.outer_lr
            for m in args.outer_momentum]
    todo = [c for c in todo if key(c) not in done and not args.table_only]
    print(f"{len(todo)} runs to go, {len(done)} stored in {args.results}", flush=True)
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, max(1, len(todo)))) as pool, \
            open(args.results, "a") as out:
        for r in pool.imap_unordered(run_one, todo):
            done[key(r)] = r
            out.write(json.dumps(r) + "\n")
            out.flush()
            print(f"W={r['workers']} H={r['inner_steps']} outer lr {r['outer_lr']:g} momentum {r['outer_momentum']:g} "
                  f"seed {r['seed']}: final {r['final_val_loss']:.4f}, bounce {r['bounce']:.4f}", flush=True)
    wanted = [r for r in done.values() if r["seed"] in args.seeds and r["batch"] == args.batch and r["lr"] == args.lr
              and r["workers"] in args.workers and r["inner_steps"] in args.inner_steps
              and (args.table_only or r["steps_per_worker"] == args.steps_per_worker)]
    print()
    print(table(wanted, args.outer_lr, args.outer_momentum))


if __name__ == "__main__":
    main()
