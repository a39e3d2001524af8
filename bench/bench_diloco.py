"""DiLoCo (W workers, H local AdamW steps, then an outer Nesterov step) against synchronous data-parallel AdamW.

Never let the two methods see different data: at equal tokens, worker k reads the same windows in the same order
in both, and both are scored on the same fixed validation batches.

usage: python -m bench.bench_diloco [--workers 4 --inner-steps 50 --rounds 6 --batch-size 16 --lr 3e-3 ...]

Everything runs in one process, on the CPU or (--device cuda) one GPU. Synchronous data parallelism averages the W workers' gradients
every step, which is exactly one AdamW step on the W-times larger batch, so that is how it is computed here.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import torch

from server.corpus import Corpus, load_corpus
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from shared.diloco import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM
from shared.model import GPTConfig, model_config, num_parameters

BYTES_PER_FLOAT32 = 4
WEIGHT_DECAY = 0.01  # torch's AdamW default, written down so both methods visibly share it


class BenchSettingsError(ValueError):
    """The settings cannot make a fair run (e.g. a worker's slice of the corpus is shorter than one window)."""


@dataclass(frozen=True)
class Settings:
    model: str = "tiny"
    workers: int = 4
    inner_steps: int = 50  # H: local AdamW steps per DiLoCo round
    rounds: int = 6
    batch_size: int = 16  # windows per worker per step
    lr: float = 3e-3  # AdamW, for DiLoCo's inner steps and for data parallelism alike
    outer_lr: float = DEFAULT_OUTER_LR
    outer_momentum: float = DEFAULT_OUTER_MOMENTUM
    validation_batches: int = 8
    validation_batch_size: int = 64
    seed: int = 0
    # One thread: the tiny model's matrices are too small to gain from a second, and on a shared 2-core machine
    # two threads ran 3 to 7 times slower than one (they wait on each other whenever a neighbour holds a core).
    threads: int = 1
    device: str = "cpu"

    @property
    def steps(self) -> int:
        """Optimizer steps per worker: H * rounds for both methods."""
        return self.inner_steps * self.rounds

    def tokens(self, cfg: GPTConfig) -> int:
        """Training tokens (predicted positions) consumed by all workers together."""
        return self.workers * self.steps * self.batch_size * cfg.block_size


@dataclass
class Result:
    method: str
    val_loss_by_round: list[float] = field(default_factory=list)  # after each round (data parallel: every H steps)
    bytes_sent_per_worker: int = 0
    messages_sent_per_worker: int = 0
    seconds: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.val_loss_by_round[-1]


class WindowSampler:
    """Random windows of block_size + 1 bytes from one worker's slice of the training text, from its own seed."""

    def __init__(self, text: bytes, block_size: int, seed: int):
        if len(text) < block_size + 1:
            raise BenchSettingsError(f"a slice of {len(text)} bytes is shorter than one window of {block_size + 1}")
        self.data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, block_size) of byte ids; targets are inputs shifted by one."""
        starts = torch.randint(0, len(self.data) - self.block_size, (batch_size,), generator=self.generator)
        windows = self.data[starts[:, None] + torch.arange(self.block_size + 1)].long()
        return windows[:, :-1], windows[:, 1:]


def worker_samplers(corpus: Corpus, cfg: GPTConfig, settings: Settings) -> list[WindowSampler]:
    """One sampler per worker, each on its own contiguous slice of the training bytes."""
    size = len(corpus.train) // settings.workers
    return [
        WindowSampler(corpus.train[k * size : (k + 1) * size], cfg.block_size, seed=settings.seed + 1 + k)
        for k in range(settings.workers)
    ]


def validation_batches(corpus: Corpus, cfg: GPTConfig, settings: Settings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sampler = WindowSampler(corpus.validation, cfg.block_size, seed=settings.seed + 10_000)
    return [sampler.batch(settings.validation_batch_size) for _ in range(settings.validation_batches)]


def model_device(model: GPT) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def validation_loss(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    device = model_device(model)
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def new_model(cfg: GPTConfig, seed: int, device: str = "cpu") -> GPT:
    model = GPT(cfg)
    init_parameters(model, seed)
    return model.to(device)


def new_adamw(model: GPT, settings: Settings) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=WEIGHT_DECAY)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    device = model_device(model)
    _, loss = model(x.to(device), y.to(device))
    loss.backward()
    optimizer.step()


def run_data_parallel(corpus: Corpus, cfg: GPTConfig, settings: Settings, val: list) -> Result:
    """Every step: each worker's batch, gradients averaged (= the mean loss over the joint batch), one AdamW step."""
    started = time.perf_counter()
    samplers = worker_samplers(corpus, cfg, settings)
    model = new_model(cfg, settings.seed, settings.device)
    optimizer = new_adamw(model, settings)
    result = Result("data parallel")
    for step in range(1, settings.steps + 1):
        batches = [s.batch(settings.batch_size) for s in samplers]
        train_step(model, optimizer, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        if step % settings.inner_steps == 0:
            result.val_loss_by_round.append(validation_loss(model, val))
    # Each worker uploads one float32 gradient per step.
    result.messages_sent_per_worker = settings.steps
    result.bytes_sent_per_worker = settings.steps * num_parameters(cfg) * BYTES_PER_FLOAT32
    result.seconds = time.perf_counter() - started
    return result


def run_diloco(corpus: Corpus, cfg: GPTConfig, settings: Settings, val: list) -> Result:
    """Each round: every worker starts from the global parameters and takes H AdamW steps on its own data; the
    coordinator averages the pseudo-gradients (global - local) and takes one Nesterov step with them.

    Each worker keeps its AdamW state from round to round, as in DiLoCo.
    """
    started = time.perf_counter()
    samplers = worker_samplers(corpus, cfg, settings)
    global_model = new_model(cfg, settings.seed, settings.device)
    global_params = torch.nn.Parameter(flat_parameters(global_model).to(settings.device))
    outer = torch.optim.SGD([global_params], lr=settings.outer_lr, momentum=settings.outer_momentum, nesterov=True)
    workers = [new_model(cfg, settings.seed, settings.device) for _ in range(settings.workers)]
    optimizers = [new_adamw(w, settings) for w in workers]
    result = Result("DiLoCo")
    for _ in range(settings.rounds):
        pseudo_gradients = []
        for worker, optimizer, sampler in zip(workers, optimizers, samplers):
            load_flat_parameters(worker, global_params.detach())
            for _ in range(settings.inner_steps):
                train_step(worker, optimizer, *sampler.batch(settings.batch_size))
            pseudo_gradients.append(global_params.detach() - flat_parameters(worker).to(settings.device))
        outer.zero_grad(set_to_none=True)
        global_params.grad = torch.stack(pseudo_gradients).mean(dim=0)
        outer.step()
        load_flat_parameters(global_model, global_params.detach())
        result.val_loss_by_round.append(validation_loss(global_model, val))
    # Each worker uploads one float32 pseudo-gradient per round.
    result.messages_sent_per_worker = settings.rounds
    result.bytes_sent_per_worker = settings.rounds * num_parameters(cfg) * BYTES_PER_FLOAT32
    result.seconds = time.perf_counter() - started
    return result


def parse_settings(argv: list[str] | None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m bench.bench_diloco", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model, help="a named size from shared.model.MODEL_SIZES")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--inner-steps", type=int, default=defaults.inner_steps, help="H, local steps per round")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="windows per worker per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (both methods)")
    parser.add_argument("--outer-lr", type=float, default=defaults.outer_lr)
    parser.add_argument("--outer-momentum", type=float, default=defaults.outer_momentum)
    parser.add_argument("--validation-batches", type=int, default=defaults.validation_batches)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--device", default=defaults.device, choices=["cpu", "cuda"],
                        help="where both methods train (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    for name in ("workers", "inner_steps", "rounds", "batch_size", "validation_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return Settings(
        model=args.model,
        workers=args.workers,
        inner_steps=args.inner_steps,
        rounds=args.rounds,
        batch_size=args.batch_size,
        lr=args.lr,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        validation_batches=args.validation_batches,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    torch.set_num_threads(settings.threads)
    if settings.device == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; a few CUDA backward kernels (embedding) never are,
        # so on a GPU the two methods may differ in the last digits from run to run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.seed)
    cfg = model_config(settings.model)
    corpus = load_corpus()
    val = validation_batches(corpus, cfg, settings)
    params = num_parameters(cfg)
    initial = validation_loss(new_model(cfg, settings.seed, settings.device), val)
    print(
        f"model {settings.model} ({params:,} parameters), {settings.workers} workers, H={settings.inner_steps}, "
        f"{settings.rounds} rounds, batch {settings.batch_size}x{cfg.block_size} per worker, AdamW lr {settings.lr:g}, "
        f"outer Nesterov lr {settings.outer_lr:g} momentum {settings.outer_momentum:g}, on {settings.device}"
    )
    print(f"corpus {corpus.name}: {len(corpus.train):,} train bytes, {len(corpus.validation):,} validation bytes")
    print(f"both methods: {settings.tokens(cfg):,} training tokens; initial validation loss {initial:.4f}")

    ddp = run_data_parallel(corpus, cfg, settings, val)
    diloco = run_diloco(corpus, cfg, settings, val)

    print(f"{'round':>5} {'tokens':>12} {'DiLoCo val':>11} {'data-parallel val':>18}")
    for r, (d, s) in enumerate(zip(diloco.val_loss_by_round, ddp.val_loss_by_round), start=1):
        tokens = settings.workers * r * settings.inner_steps * settings.batch_size * cfg.block_size
        print(f"{r:>5} {tokens:>12,} {d:>11.4f} {s:>18.4f}")
    for res in (ddp, diloco):
        print(
            f"{res.method:<14} final val loss {res.final_val_loss:.4f}; each worker sent {res.messages_sent_per_worker} "
            f"fp32 vectors = {res.bytes_sent_per_worker / 1e6:.2f} MB; {res.seconds:.1f} s"
        )
    print(f"ratio val loss DiLoCo / data parallel: {diloco.final_val_loss / ddp.final_val_loss:.4f}")
    print(f"ratio bytes sent per worker, data parallel / DiLoCo: {ddp.bytes_sent_per_worker / diloco.bytes_sent_per_worker:.1f}x")


if __name__ == "__main__":
    main()
