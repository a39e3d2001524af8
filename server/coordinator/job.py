"""A training job and its persistence: the job's config as the command line starts it, kept in the store, and the
global model at the last committed round (initialised and committed as round 0 on a job's first start).

Never let a restart change what the job is: the model, seed and codec are fixed for its life, the governed
parameters change only by vote, and a data directory that holds another model's job is refused (JobMismatch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from server import aggregation
from server.coordinator.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from server.coordinator.model_state import GlobalModel
from server.coordinator.store import RoundRecord, Store
from server.corpus import Corpus
from server.keys import NodeKey
from server.tokenizer import parse_tokenizer
from shared import compress
from shared.diloco import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM
from shared.model import GPTConfig, model_config
from shared.rewards import round_record_bytes

if TYPE_CHECKING:
    from server.coordinator.strategy import RoundStrategy

log = logging.getLogger("swarmgrad.coordinator")


class JobMismatch(Exception):
    """The data directory holds a different job than the one asked for on the command line."""


@dataclass(frozen=True)
class JobConfig:
    """One training job as the command line starts it. The model, seed and codec are fixed for the job's life;
    the governed parameters (inner steps, learning rate, batch, aggregator, deadline, outer step) seed the job's
    governance on first start, and from then on only votes change them."""

    model: str = "tiny"
    inner_steps: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch: int = 16  # sequences per inner step
    deadline_seconds: float = 60.0  # seconds from a round's opening to its deadline
    rounds: int = 0  # 0 = forever
    outer_lr: float = DEFAULT_OUTER_LR
    outer_momentum: float = DEFAULT_OUTER_MOMENTUM
    # overlapped rounds: round r+1 opens on the model before round r's aggregate, so that nodes start it as soon as
    # they have sent round r's update; each aggregate then steps the model one round later (a delayed outer step)
    overlap: bool = False
    aggregator: str = "mean"
    byzantine_fraction: float = 0.25  # the share of updates a robust aggregator is told to tolerate (its f)
    codec: str = "fp32"
    delta_codec: str = "int8"  # how each round's outer delta travels to nodes (with error feedback); fixed for the job
    seed: int = 0
    verify_share: float = 0.05  # the share of updates the coordinator re-executes (spot checks); not governed
    tokenizer: str = "bytes"  # bytes or bpe:VOCAB (server/tokenizer.py); fixed for the job's life

    def __post_init__(self) -> None:
        model_config(self.model)  # KeyError naming the known sizes
        if self.inner_steps < 1 or self.batch < 1 or self.deadline_seconds <= 0 or self.rounds < 0:
            raise ValueError("inner_steps and batch must be >= 1, deadline_seconds > 0, rounds >= 0")
        # one spelling per tokenizer (TokenizerError, a ValueError, says what is wrong)
        object.__setattr__(self, "tokenizer", str(parse_tokenizer(self.tokenizer)))
        if not 0.0 <= self.verify_share <= 1.0:
            raise ValueError(f"verify_share must lie in [0, 1], got {self.verify_share}")
        if self.aggregator not in aggregation.RULES:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: {', '.join(aggregation.RULES)}")
        for name, text in (("codec", self.codec), ("delta codec", self.delta_codec)):
            try:
                compress.parse_codec(text)
            except compress.CodecError as e:
                raise ValueError(f"bad {name} {text!r}: {e}") from None

    def gpt_config(self) -> GPTConfig:
        """The model's configuration: the named size with the tokenizer's vocabulary."""
        return replace(model_config(self.model), vocab_size=parse_tokenizer(self.tokenizer).vocab_size)

    def governed(self) -> dict:
        """The governed parameters, under the names governance uses."""
        return {"inner_steps": self.inner_steps, "lr": self.lr, "batch": self.batch,
                "aggregator": self.aggregator, "deadline_seconds": self.deadline_seconds, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "overlap": self.overlap}


RENAMED = {"batch_size": "batch", "round_deadline": "deadline_seconds"}  # old stored name -> the one name now


def load_job(store: Store, data_dir: Path, corpus: Corpus, job: JobConfig) -> JobConfig:
    """The job this data directory runs: `job` on a first start (stored with the corpus's digest), else the stored
    job with this start's round count and spot-check share. Raises JobMismatch for another model's job."""
    stored = store.get_meta("job")
    if stored is None:
        store.set_meta("job", asdict(job))
        store.set_meta("corpus", {"name": corpus.name, "sha256": corpus.digest})
        return job
    stored = {RENAMED.get(k, k): v for k, v in stored.items()}  # a job stored before the settings were renamed
    stored_job = JobConfig(**stored)
    if stored_job.model != job.model:
        raise JobMismatch(f"{data_dir} holds a job for model {stored_job.model!r}, not {job.model!r}; "
                          "use another --data-dir to start a new job")
    known = store.get_meta("corpus") or {}
    if known.get("sha256") != corpus.digest:
        log.warning("the corpus differs from the one this job started with (%s)", known.get("name"))
    # the round count and the spot-check share may change across restarts; governed parameters only by vote
    if stored_job.tokenizer != job.tokenizer:
        log.warning("this job's tokenizer is %s, fixed for its life; --tokenizer %s is ignored", stored_job.tokenizer,
                    job.tokenizer)
    merged = JobConfig(**{**stored, "rounds": job.rounds, "verify_share": job.verify_share})
    store.set_meta("job", asdict(merged))
    return merged


def load_model(store: Store, data_dir: Path, key: NodeKey, job: JobConfig, strategy: RoundStrategy) -> GlobalModel:
    """The model of the last committed round, read from its checkpoint and checked against the store. A new job
    first initialises the model from its seed and commits it as round 0."""
    last = store.last_round()
    if last is None:
        params = strategy.initial_parameters(job.seed)
        val = strategy.evaluate(params)
        ckpt = Checkpoint(0, params, None)
        path, sha = write_checkpoint(data_dir / "checkpoints", ckpt)
        now = time.time()
        signature = key.sign(round_record_bytes(0, ckpt.model_hash, ""))
        store.commit_round(RoundRecord(0, ckpt.model_hash, path.name, sha, val, 0, 0, 0, 0, now, now, now, "",
                                       signature), [])
        last = store.last_round()
        log.info("initialised %s (%d parameters), validation loss %.4f", job.model, params.size, val)
    ckpt = read_checkpoint(data_dir / "checkpoints" / last.checkpoint, last.checkpoint_sha256)
    previous_hash = None
    if last.round > 0:
        rounds = store.rounds()
        previous_hash = rounds[-2].model_hash if len(rounds) > 1 else None
    model = GlobalModel.from_checkpoint(ckpt, previous_hash)
    if model.hash != last.model_hash or ckpt.round != last.round:
        raise RuntimeError(f"checkpoint {last.checkpoint} does not match committed round {last.round}")
    if last.round:
        log.info("resumed at round %d (validation loss %s)", last.round, last.val_loss)
    return model
