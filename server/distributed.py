"""One trainer node of several ranks under torchrun: rank 0 runs the Node, and every rank trains its rows of each step.

Never let a rank other than 0 talk to the coordinator, and never let ranks disagree on the step they stop at: a rank
left alone in a collective hangs the node.

Each inner step's batch (the schedule's rows, as one process trains them) is split among the ranks by rows, and their
gradients are averaged (DDP, or FSDP, which also shards the model), so the node's update is the one-process update up
to float reduction order: tokens, H and batch mean what they mean for one process, and the coordinator's spot check
re-executes it with `server.training.inner_steps`. Rank 0 broadcasts each round's work (a `RankWork`, then the
shard when it is new, then the start parameters); the other ranks loop on it until a stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from server.model import GPT, flat_parameters, load_flat_parameters
from server.trainer import Trainer, TrainerOptions, resolve_device
from server.training import batch_at, inner_optimizer
from shared.model import GPTConfig, num_parameters
from shared.node import Refused, Stopped, Work

log = logging.getLogger("swarmgrad.distributed")

# How long ranks 1.. wait for rank 0's next word. Between rounds rank 0 waits on the coordinator (a round deadline,
# other nodes, reconnects with backoff), so this is far longer than any round; a rank that dies is noticed sooner by
# torchrun, which then stops them all.
IDLE_WAIT = timedelta(days=7)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what torchrun forwards when it is stopped


def world_size() -> int:
    """How many ranks torchrun started for this node: its WORLD_SIZE, 1 outside torchrun."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise Refused(f"WORLD_SIZE={text!r} is not a number of ranks; start ranks with torchrun --nproc-per-node N")
    return size


@dataclass
class Ranks:
    """This process's place in the node: its `rank` of `size`, its torch `device` (cuda:LOCAL_RANK, or the CPU with
    gloo), and `control`, a patient gloo group that carries rank 0's word between rounds."""

    rank: int
    size: int
    device: torch.device
    control: Any = field(repr=False)

    @classmethod
    def join(cls, device_option: str) -> "Ranks":
        """Join torchrun's process group (env://: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on
        CUDA, gloo on the CPU."""
        try:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise Refused(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not a rank; start ranks with torchrun") from None
        device = resolve_device(device_option)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise Refused(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                              "start at most one rank per GPU (torchrun --nproc-per-node)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        control = dist.new_group(backend="gloo", timeout=IDLE_WAIT)
        return cls(dist.get_rank(), dist.get_world_size(), device, control)

    def leave(self) -> None:
        dist.destroy_process_group()


@dataclass(frozen=True)
class RankWork:
    """Rank 0's word to the other ranks: a round's training as `Work` has it, or `stop`. `shard_tokens` > 0 says a
    new shard of that many token ids follows on the broadcast; 0, that the shard held last round is the round's."""

    stop: bool = False
    cfg: GPTConfig | None = None
    round: int = 0
    schedule: list = field(default_factory=list)
    seq_len: int = 0
    lr: float = 0.0
    weight_decay: float = 0.0
    shard_tokens: int = 0


def row_range(rows: int, rank: int, size: int) -> tuple[int, int]:
    """The rows [lo, hi) of a step's `rows` that `rank` of `size` trains: contiguous, sizes differ by one at most."""
    return rows * rank // size, rows * (rank + 1) // size


def parameter_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short digest of parameters' float32 bit patterns, summed on their device (one exact int64 sum per tensor):
    parameters that differ in one value differ in that value's bits, hence in its tensor's sum."""
    sums = torch.stack([t.detach().reshape(-1).view(torch.int32).sum(dtype=torch.int64) for t in tensors])
    return hashlib.sha256(",".join(map(str, sums.tolist())).encode()).hexdigest()[:16]


class ReplicatedModel:
    """DDP: every rank holds the whole model; gradients are averaged after each backward."""

    shards = False

    def __init__(self, cfg: GPTConfig, ranks: Ranks):
        self.ranks, self.size = ranks, num_parameters(cfg)
        self.model = GPT(cfg).to(ranks.device)
        self.module = DistributedDataParallel(self.model, device_ids=[ranks.device] if ranks.device.type == "cuda"
                                              else None)

    def load(self, start: torch.Tensor | None) -> None:
        """Every rank takes rank 0's `start` (flat float32; None on the other ranks)."""
        flat = start.to(self.ranks.device) if start is not None else torch.empty(self.size, device=self.ranks.device)
        dist.broadcast(flat, 0)
        load_flat_parameters(self.model, flat)

    def gathered(self) -> torch.Tensor | None:
        """The trained parameters, flat on the CPU, on rank 0 (None elsewhere)."""
        return flat_parameters(self.model) if self.ranks.rank == 0 else None

    def digest(self) -> str:
        return parameter_digest(self.model.parameters())


class ShardedModel:
    """FSDP (torch's fully_shard, per block and the rest): each rank holds a shard of every parameter and of its
    optimizer state, gathered layer by layer for compute; no rank ever holds the whole model on its device."""

    shards = True

    def __init__(self, cfg: GPTConfig, ranks: Ranks):
        from torch.distributed.fsdp import fully_shard

        self.ranks = ranks
        with torch.device("meta"):  # no memory: each rank materialises its shards only
            self.model = GPT(cfg)
        self.shapes = [(name, p.shape) for name, p in self.model.named_parameters()]
        for block in self.model.h:
            fully_shard(block)
        fully_shard(self.model)
        self.model.to_empty(device=ranks.device)
        self.module = self.model

    def load(self, start: torch.Tensor | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full, offset = {}, 0
        if start is not None:
            for name, shape in self.shapes:
                n = shape.numel()
                full[name] = start[offset : offset + n].view(shape)
                offset += n
        set_model_state_dict(self.model, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def gathered(self) -> torch.Tensor | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ranks.rank != 0:
            return None
        return torch.cat([state[name].reshape(-1).float() for name, _ in self.shapes])

    def digest(self) -> str:
        return parameter_digest(p.to_local() for p in self.model.parameters())  # of this rank's shards


MODELS = {"ddp": ReplicatedModel, "fsdp": ShardedModel}  # --parallel (server/cli.py lists the same names)


def split_steps(module: torch.nn.Module, ranks: Ranks, data: torch.Tensor, schedule: list[list[int]], seq_len: int,
                lr: float, weight_decay: float, stop: threading.Event,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`server.training.inner_steps` with each step's rows split among the ranks (`row_range`). A rank's loss (its
    rows' mean) is weighted by its share of the rows times the rank count that the gradient average divides by, so
    the averaged gradient is the whole batch's, as one process computes it. Returns each step's whole-batch loss.
    Raises Stopped when any rank's `stop` was set: every rank then stops after the same step.
    """
    optimizer = inner_optimizer(module, lr, weight_decay)
    module.train()
    losses = []
    for step, starts in enumerate(schedule):
        lo, hi = row_range(len(starts), ranks.rank, ranks.size)
        share = (hi - lo) / len(starts)
        # a rank with no rows (a batch smaller than the node) still joins the step's average, at weight 0
        x, y = batch_at(data, starts[lo:hi] if hi > lo else starts[:1], seq_len)
        _, loss = module(x.to(ranks.device), y.to(ranks.device))
        optimizer.zero_grad(set_to_none=True)
        (loss * (share * ranks.size)).backward()
        optimizer.step()
        agreed = torch.stack([loss.detach().float() * share,
                              torch.tensor(1.0 if stop.is_set() else 0.0, device=ranks.device)])
        dist.all_reduce(agreed)  # the whole batch's loss, and whether any rank was asked to stop
        loss_value, stops = agreed.tolist()
        losses.append(loss_value)
        if on_step is not None:
            on_step(step, loss_value)
        if stops > 0:
            raise Stopped(f"stopped with the other ranks after step {step + 1} of {len(schedule)}")
    return losses


class Rank:
    """What one rank keeps across rounds: its part of the model (built when the job's model changes) and the shard."""

    def __init__(self, ranks: Ranks, parallel: str):
        if parallel not in MODELS:
            raise Refused(f"--parallel must be one of {', '.join(MODELS)}, not {parallel!r}")
        self.ranks, self.parallel = ranks, parallel
        self.stop = threading.Event()  # set by a stop signal to this rank; read by every rank at each step
        self.model: ReplicatedModel | ShardedModel | None = None
        self.cfg: GPTConfig | None = None
        self.shard: torch.Tensor | None = None

    def run(self, work: RankWork, shard: torch.Tensor | None = None, start: torch.Tensor | None = None,
            on_step: Callable[[int, float], None] | None = None) -> tuple[list[float], torch.Tensor | None]:
        """Train `work` with the other ranks (rank 0 passes the shard and the start parameters, flat float32).
        Returns (the losses, the trained parameters on rank 0, else None); raises Stopped as split_steps does."""
        if work.cfg != self.cfg:
            self.model, self.cfg = MODELS[self.parallel](work.cfg, self.ranks), work.cfg
        if work.shard_tokens:
            self.shard = self._broadcast_shard(shard, work.shard_tokens)
        self.model.load(start)
        try:
            losses = split_steps(self.model.module, self.ranks, self.shard, work.schedule, work.seq_len, work.lr,
                                 work.weight_decay, self.stop, on_step)
        except Stopped as e:
            log.info("rank %d/%d: round %d: %s", self.ranks.rank, self.ranks.size, work.round + 1, e)
            raise
        trained = self.model.gathered()
        lo, hi = row_range(len(work.schedule[0]), self.ranks.rank, self.ranks.size)
        what = "its shards" if self.model.shards else "parameters"
        log.info("rank %d/%d: round %d: %d steps on rows %d-%d of %d; %s digest %s", self.ranks.rank,
                 self.ranks.size, work.round + 1, len(work.schedule), lo, hi, len(work.schedule[0]), what,
                 self.model.digest())
        return losses, trained

    def _broadcast_shard(self, shard: torch.Tensor | None, size: int) -> torch.Tensor:
        device = self.ranks.device  # (int64 ids, as server.training.token_tensor reads them: a shard is small)
        data = shard.to(device) if shard is not None else torch.empty(size, dtype=torch.int64, device=device)
        dist.broadcast(data, 0)
        return shard if shard is not None else data.cpu()


class Leader(Rank):
    """Rank 0: tells the others each round's work and trains with them; TorchPort's `ranks`. `prepare`, `train` and
    `trained` stand in for its own model; `close` ends the others' loop."""

    def __init__(self, ranks: Ranks, parallel: str):
        super().__init__(ranks, parallel)
        self.job_cfg: GPTConfig | None = None
        self._shard_held: torch.Tensor | None = None  # the shard the other ranks hold (by identity: Node caches them)
        self._trained: torch.Tensor | None = None
        self._others_left = False  # they stopped with rank 0 at a step (or may be stuck after an error)

    def prepare(self, cfg: GPTConfig) -> None:
        self.job_cfg = cfg  # the ranks build it together, at their next round

    def train(self, work: Work, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Work.steps steps of the whole node; raises Stopped when a rank was asked to stop."""
        new_shard = work.shard is not self._shard_held
        order = RankWork(cfg=self.job_cfg, round=work.round, schedule=work.schedule, seq_len=work.seq_len,
                         lr=work.lr, weight_decay=work.weight_decay,
                         shard_tokens=work.shard.numel() if new_shard else 0)
        # Until this round ends well, the others wait on no word from rank 0: after a stop they have left, and after
        # an error they may sit in a collective, where a word would hang rank 0 too (torchrun stops them when it ends)
        self._others_left = True
        dist.broadcast_object_list([order], src=0, group=self.ranks.control)
        self._shard_held = work.shard
        losses, self._trained = self.run(order, work.shard, torch.from_numpy(work.model), on_step)
        self._others_left = False
        return losses

    def trained(self) -> torch.Tensor:
        """The parameters the last `train` ended with, flat float32 on the CPU."""
        return self._trained

    def close(self) -> None:
        """Tell the other ranks to leave (once; not when they stopped with rank 0 at a step, nor after an error in a
        round)."""
        if not self._others_left:
            self._others_left = True
            log.info("rank 0/%d: telling the other ranks to leave", self.ranks.size)
            dist.broadcast_object_list([RankWork(stop=True)], src=0, group=self.ranks.control)


def follow(ranks: Ranks, parallel: str) -> int:
    """Ranks 1..: train what rank 0 says until it says stop. A stop signal here stops the node at the next step."""
    rank = Rank(ranks, parallel)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: rank.stop.set())
    while True:
        order: list[Any] = [None]
        dist.broadcast_object_list(order, src=0, group=ranks.control)
        if order[0].stop:
            log.info("rank %d/%d: rank 0 says leave", ranks.rank, ranks.size)
            return 0
        try:
            rank.run(order[0])
        except Stopped:
            return 0


async def lead(options: TrainerOptions, ranks: Ranks, parallel: str) -> int:
    """Rank 0: the trainer's Node, training with the other ranks. A stop signal makes it leave the coordinator with a
    goodbye, stopping the ranks mid-round if they are training; then (or when it ends any other way between rounds)
    the other ranks are told to leave."""
    leader = Leader(ranks, parallel)
    try:
        trainer = Trainer(options, ranks=leader)
        trainer.port.agent += f" x{ranks.size} ranks ({parallel})"

        def stop() -> None:
            leader.stop.set()
            trainer.node.stop()

        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:  # torchrun forwards the signal it gets; a second one must not cut the goodbye
            loop.add_signal_handler(sig, stop)
        code = await trainer.run()
        log.info("rank 0/%d: the node left the coordinator (exit code %d)", ranks.size, code)
        return code
    finally:
        leader.close()


def run(options: TrainerOptions, parallel: str) -> int:
    """`python -m server trainer` as one of torchrun's ranks; this rank's exit code."""
    ranks = Ranks.join(options.device)
    log.info("rank %d/%d on %s, %s", ranks.rank, ranks.size, ranks.device, parallel)
    try:
        if ranks.rank == 0:
            return asyncio.run(lead(options, ranks, parallel))
        return follow(ranks, parallel)
    finally:
        ranks.leave()
