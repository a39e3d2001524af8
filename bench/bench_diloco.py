"""DiLoCo as users run it (the coordinator's own round logic, with simulated workers: server/sim), per update codec,
against synchronous data parallel trained on the same tokens in the same run.

Never let the two methods see different data or count bytes from settings: data parallel replays, step by step,
the very batches the simulated workers trained on, and the bytes are what the workers' nodes uploaded.

usage: python -m bench.bench_diloco [--workers 4] [--inner-steps 50] [--rounds 6] [--batch 16] [--lr 3e-3]
       [--outer-lr L] [--outer-momentum M] [--model tiny] [--codec fp32 --codec int8 ...] [--overlap] [--seed 0]
       [--threads 1]

Each codec is one `server.sim.run_simulation` job: the real coordinator (aggregation, outer Nesterov step, int8
deltas down, validation), and workers running the real node (a fresh AdamW for H steps, the codec with error
feedback, the signed upload). Data parallel is one AdamW step per inner step on the union of the workers' batches
of that step (the mean of their gradients), from the same initial parameters, scored on the coordinator's
validation batches. Its bytes are one fp32 gradient per worker and inner step. With --overlap each codec is also run
with overlapped rounds (the job's `overlap`: round r+1 trains on the model before round r's aggregate, which steps
the model a round late), on the same batches. Everything runs on the CPU, where a seed and a thread count give the
same numbers every time.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from server.coordinator import JobConfig
from server.corpus import Corpus, load_corpus
from server.model import GPT, init_parameters
from server.options import CODEC_HELP, codec_option, int_at_least
from server.sim import BYTES_PER_FP32, SimOptions, SimulationResult, Training, run_simulation
from server.training import batch_at, evaluate, validation_batches
from shared.batches import ADAMW_BETAS, ADAMW_EPS
from shared.model import MODEL_SIZES, model_config, num_parameters

DEFAULT_CODECS = ["fp32", "int8", "topk", "sparseloco"]
# 3 MB of the stdlib source: Python only, before the unicode code-page tables (as tests/test_simulate.py)
CORPUS_BYTES = 3_000_000


class BenchError(RuntimeError):
    """The runs cannot be compared: the codecs' jobs trained on different batches."""


@dataclass(frozen=True)
class Job:
    """One simulator job of the bench: a codec, with or without overlapped rounds."""

    codec: str
    overlap: bool = False

    @property
    def label(self) -> str:
        return f"{self.codec}, overlapped" if self.overlap else self.codec

    @property
    def column(self) -> str:  # the per-round table's header
        return f"{self.codec}+overlap" if self.overlap else self.codec


def same_batches(a: list[Training], b: list[Training]) -> bool:
    return len(a) == len(b) and all(
        (x.round, x.node_id, x.schedule, x.seq_len) == (y.round, y.node_id, y.schedule, y.seq_len)
        and torch.equal(x.shard, y.shard) for x, y in zip(a, b))


def run_data_parallel(trainings: list[Training], corpus: Corpus, options: SimOptions) -> dict:
    """Synchronous data parallel over the workers' own batches: per round, per inner step, one AdamW step on the
    union of every worker's batch of that step. Returns the validation loss after each round and its byte counts."""
    cfg = model_config(options.model)
    model = GPT(cfg)
    init_parameters(model, options.seed)  # the coordinator's initial model (RoundStrategy.initial_parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                  weight_decay=JobConfig().weight_decay)
    val = validation_batches(corpus.validation, cfg.block_size)  # the coordinator's (RoundStrategy)
    losses = [evaluate(model, val)]
    by_round: dict[int, list[Training]] = defaultdict(list)
    for t in trainings:
        by_round[t.round].append(t)
    gradients = tokens = 0
    model.train()
    for round_ in sorted(by_round):
        workers = by_round[round_]
        for step in range(max(t.steps for t in workers)):
            batches = [batch_at(t.shard, t.schedule[step], t.seq_len) for t in workers if step < t.steps]
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            gradients += len(batches)  # each worker would send its gradient of this step
            tokens += y.numel()
        losses.append(evaluate(model, val))
    return {"val_loss": losses, "tokens": tokens,
            "bytes_per_token": BYTES_PER_FP32 * num_parameters(cfg) * gradients / tokens}


def parse(argv: list[str] | None) -> argparse.Namespace:
    d = SimOptions()
    p = argparse.ArgumentParser(prog="python -m bench.bench_diloco", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int_at_least(1), default=4)
    p.add_argument("--inner-steps", type=int_at_least(1), default=50, help="H, local steps per round")
    p.add_argument("--rounds", type=int_at_least(1), default=6)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int_at_least(1), default=16,
                   help="windows per worker per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (both methods)")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="(default: the job default, %(default)s)")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="(default: the job default, %(default)s)")
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny")
    p.add_argument("--codec", type=codec_option, action="append", metavar="CODEC",
                   help=CODEC_HELP + f"; repeat for several (default: {' '.join(DEFAULT_CODECS)})")
    p.add_argument("--overlap", action="store_true",
                   help="also run each codec with overlapped rounds (the coordinator's --overlap), one more job each")
    p.add_argument("--corpus-bytes", type=int_at_least(65_536), default=CORPUS_BYTES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    codecs = args.codec or DEFAULT_CODECS
    jobs = [Job(c) for c in codecs] + ([Job(c, overlap=True) for c in codecs] if args.overlap else [])
    logging.getLogger("swarmgrad").setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    base = dict(workers=args.workers, inner_steps=args.inner_steps, rounds=args.rounds, batch=args.batch, lr=args.lr,
                outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, model=args.model, seed=args.seed,
                corpus_bytes=args.corpus_bytes, threads=args.threads, out=None)
    started = time.perf_counter()
    runs: dict[Job, SimulationResult] = {}
    for job in jobs:
        runs[job] = run_simulation(SimOptions(**base, codec=job.codec, overlap=job.overlap))
        if not same_batches(runs[jobs[0]].trainings, runs[job].trainings):
            raise BenchError(f"the {job.label} job trained on other batches than the {jobs[0].label} job; "
                             "no fair baseline")
    options = SimOptions(**base)
    torch.set_num_threads(args.threads)
    ddp = run_data_parallel(runs[jobs[0]].trainings, load_corpus(None, args.corpus_bytes), options)
    s0 = runs[jobs[0]].summary
    if ddp["tokens"] != s0["tokens_trained"] or abs(ddp["bytes_per_token"] - s0["ddp_bytes_per_token"]) > 1e-9:
        raise BenchError(f"data parallel counted {ddp['tokens']} tokens and {ddp['bytes_per_token']} bytes per token; "
                         f"the simulator {s0['tokens_trained']} and {s0['ddp_bytes_per_token']}")
    cfg = model_config(args.model)
    print(f"model {args.model} ({s0['params']:,} parameters), {args.workers} workers, H={args.inner_steps}, "
          f"{args.rounds} rounds, batch {args.batch}x{cfg.block_size} per worker, AdamW lr {args.lr:g}, outer "
          f"Nesterov lr {args.outer_lr:g} momentum {args.outer_momentum:g}, int8 deltas down, seed {args.seed}")
    print(f"both methods: {ddp['tokens']:,} training tokens, the same windows; initial validation loss "
          f"{ddp['val_loss'][0]:.4f}\n")
    widths = [max(14, len(job.column) + 2) for job in jobs]
    print(f"{'round':>5} {'data parallel':>14}" + "".join(f"{job.column:>{w}}" for job, w in zip(jobs, widths)))
    for r, loss in enumerate(ddp["val_loss"]):
        print(f"{r:>5} {loss:>14.4f}" + "".join(f"{runs[job].rows[r]['val_loss']:>{w}.4f}"
                                                 for job, w in zip(jobs, widths)))
    print()
    print("| codec | final val loss | x data parallel | update bytes/token | x fewer than fp32 DDP "
          "| model bytes down/token |")
    print("|---|---|---|---|---|---|")
    print(f"| data parallel (fp32) | {ddp['val_loss'][-1]:.4f} | 1.000 | {ddp['bytes_per_token']:,.1f} | 1.0 "
          f"| {ddp['bytes_per_token']:,.1f} |")
    for job in jobs:
        s = runs[job].summary
        down = (s["model_bytes_from_peers"] + s["model_bytes_from_coordinator"]) / s["tokens_trained"]
        print(f"| DiLoCo {job.label} | {s['final_val_loss']:.4f} | {s['final_val_loss'] / ddp['val_loss'][-1]:.3f} "
              f"| {s['bytes_per_token']:,.2f} | {ddp['bytes_per_token'] / s['bytes_per_token']:,.1f} | {down:,.2f} |")
    if args.overlap:
        print("\noverlapped rounds against the same codec without them (final val loss, update bytes/token):")
        for codec in codecs:
            on, off = runs[Job(codec, overlap=True)].summary, runs[Job(codec)].summary
            print(f"  {codec}: x{on['final_val_loss'] / off['final_val_loss']:.3f} loss, "
                  f"x{on['bytes_per_token'] / off['bytes_per_token']:.3f} bytes")
    print(f"\n(update bytes: what the workers' nodes uploaded; down: every model byte the workers fetched, the first "
          f"round's snapshot included; data parallel's, one fp32 gradient per worker and step each way)\n"
          f"{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
