"""The swarm simulator: the real coordinator and its real signaling server, and simulated workers that run the
real node (shared/node.py, as the trainer does) with torch CPU, real corpus shards, real codecs and signed
updates, over in-process sockets that carry the real wire frames (server/sim/worker.py). With --peers K the
workers open in-process peer links through the real signaling relay and fetch model chunks from each other with
the node's own mesh code (shared/swarm.py), as the coordinator-as-tracker advises; server/sim/network.py models
the same data plane's timing at scales one process cannot train.

It measures robustness to attackers, churn and compression at a scale one machine holds. Never open a socket,
and never reach into the coordinator's round logic: workers see and send only the frames a real node would.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from server import aggregation
from server.codecs import apply_delta
from server.coordinator import Coordinator, JobConfig
from server.coordinator.tracker import DEFAULT_PEERS
from server.corpus import DEFAULT_MAX_BYTES, Corpus, CorpusError, load_corpus
from server.model import GPT
from server.net.signaling import SignalingServer
from server.options import CODEC_HELP, codec_option, fraction, int_at_least, share_option
from server.sim.attacks import ATTACKS, SCALE_ATTACK_FACTOR, alie_z, corrupt
from server.sim.worker import PeerExchange, SimPort, worker_key
from server.training import token_tensor
from shared import compress
from shared.governance import GovernanceError
from shared.model import MODEL_SIZES
from shared.node import Ended, Node

__all__ = ["ATTACKS", "SimOptions", "Simulation", "SimulationError", "SimulationResult", "Training", "alie_z", "corrupt",
           "main", "run_simulation", "simulation_rules"]

log = logging.getLogger("swarmgrad.simulate")

MAX_BYZANTINE = 0.5  # at half or more liars no rule can tell the honest side; refuse the question
# Rounds take seconds here, not the minutes of a real swarm, and workers train one after another in one event
# loop, so the wall-clock deadline must never cut a simulated worker: the widest deadline the default rules
# allow, pinned there (simulation_rules), so that neither the coordinator's policy nor a node's plan cuts H.
SIM_ROUND_DEADLINE_S = 3600.0
WAIT_TIMEOUT_S = 600.0  # a coordinator that says nothing for this long is stuck: fail, do not hang
# The default rulebook caps joins at 60 per wall-clock minute. A simulated minute holds dozens of rounds, so
# the cap would measure the simulator's speed rather than the swarm's churn; the simulator lifts it (and says so).
JOIN_RULE_DEFAULT = '{ param = "joins_last_minute", op = "<", value = 60 }'
JOIN_RULE_SIMULATED = '{ param = "joins_last_minute", op = "<", value = 1000000000 }'
DEADLINE_RULE_DEFAULT = '{ param = "deadline_seconds", op = ">=", value = 5.0 }'
DEADLINE_RULE_SIMULATED = f'{{ param = "deadline_seconds", op = ">=", value = {SIM_ROUND_DEADLINE_S} }}'
DEFAULT_OUT = Path("swarmgrad-sim")
BYTES_PER_FP32 = 4  # synchronous data parallel sends one fp32 gradient per inner step: the bytes-per-token baseline


class SimulationError(ValueError):
    """The simulation was asked for something it cannot run, or the coordinator stopped answering."""


@dataclass(frozen=True)
class SimOptions:
    """One simulated run. Fractions are of the worker count; the job fields mean what JobConfig's mean."""

    workers: int = 12
    byzantine: float = 0.0  # share of workers that attack
    attack: str = "signflip"
    aggregator: str = "mean"
    codec: str = "fp32"
    delta_codec: str = JobConfig().delta_codec
    churn: float = 0.0  # share of workers replaced by new ones (new keys) after each round
    rounds: int = 10
    inner_steps: int = 10
    batch: int = 8
    lr: float = 3e-3
    outer_lr: float = JobConfig().outer_lr
    outer_momentum: float = JobConfig().outer_momentum
    model: str = "tiny"
    seed: int = 0
    tolerate: float | None = None  # the f the robust rules are told, as a share; None: max(0.25, attackers' share)
    scale_factor: float = SCALE_ATTACK_FACTOR
    out: Path | None = DEFAULT_OUT  # CSV and PNG go here; None writes nothing
    data: Path | None = None  # a corpus path (default: the Python standard library's source)
    corpus_bytes: int = DEFAULT_MAX_BYTES
    rules: Path | None = None  # a rulebook TOML (default: shared/default_rules.toml with the join cap lifted)
    threads: int = 1
    # spot checks re-execute updates on the coordinator; off by default here, so that what a run measures is the
    # aggregation rule against its attackers (spot checks would remove most of them before it sees them)
    verify_share: float = 0.0
    peers: int = DEFAULT_PEERS  # peer links the coordinator (as tracker) advises per worker; 0 = the star
    background_settle: bool = True  # False: each round commits before the next one opens (the old critical path)
    overlap: bool = False  # overlapped rounds (JobConfig.overlap): each aggregate steps the model a round later

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SimulationError(f"--workers must be at least 1, got {self.workers}")
        if not 0.0 <= self.byzantine < MAX_BYZANTINE:
            raise SimulationError(f"--byzantine must be a fraction in [0, {MAX_BYZANTINE}), got {self.byzantine}")
        if self.attack not in ATTACKS:
            raise SimulationError(f"unknown --attack {self.attack!r}; known: {', '.join(ATTACKS)}")
        if self.aggregator not in aggregation.RULES:
            raise SimulationError(f"unknown --aggregator {self.aggregator!r}; known: {', '.join(aggregation.RULES)}")
        for option, text in (("--codec", self.codec), ("--delta-codec", self.delta_codec)):
            try:
                compress.parse_codec(text)
            except compress.CodecError as e:
                raise SimulationError(f"bad {option} {text!r}: {e}") from None
        if not 0.0 <= self.churn < 1.0:
            raise SimulationError(f"--churn must be a fraction in [0, 1), got {self.churn}")
        if self.tolerate is not None and not 0.0 <= self.tolerate < MAX_BYZANTINE:
            raise SimulationError(f"--tolerate must be a fraction in [0, {MAX_BYZANTINE}), got {self.tolerate}")
        if self.rounds < 1 or self.inner_steps < 1 or self.batch < 1 or self.threads < 1:
            raise SimulationError("--rounds, --inner-steps, --batch and --threads must be at least 1")
        if self.peers < 0:
            raise SimulationError(f"--peers must be at least 0 (0 is the star), got {self.peers}")
        if self.corpus_bytes < 65_536:
            raise SimulationError(f"--corpus-bytes must be at least 65536 (one shard), got {self.corpus_bytes}")
        if self.model not in MODEL_SIZES:
            raise SimulationError(f"unknown --model {self.model!r}; known: {', '.join(MODEL_SIZES)}")
        if self.byzantine > 0 and self.attackers == 0:
            raise SimulationError(f"--byzantine {self.byzantine} of {self.workers} workers rounds to no attacker")

    @property
    def attackers(self) -> int:
        return round(self.byzantine * self.workers)

    @property
    def tolerated_fraction(self) -> float:
        if self.tolerate is not None:
            return self.tolerate
        # a hair above the attackers' share, so that int(n * fraction) lands on the attacker count
        return max(JobConfig().byzantine_fraction, self.attackers / self.workers + 1e-9)


@dataclass(frozen=True)
class Training:
    """One worker's inner steps in one round, as it ran them: enough to count its tokens and to replay its batches
    (bench/bench_diloco.py trains its data-parallel baseline on exactly these)."""

    round: int
    node_id: str
    shard: torch.Tensor  # the shard's bytes as the worker trained on them (one tensor shared by its workers)
    schedule: list  # shared.batches.batch_starts: starts[step][row] into `shard`
    seq_len: int

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def tokens(self) -> int:
        """Predicted positions: what the update claims (shared.batches.tokens_allowed)."""
        return sum(len(rows) for rows in self.schedule) * self.seq_len


class SimWorker:
    """One simulated worker: the real node, its port and the task that runs it."""

    def __init__(self, sim: "Simulation", index: int, byzantine: bool) -> None:
        self.index, self.byzantine = index, byzantine
        self.port = SimPort(sim, index, worker_key(sim.options.seed, index), byzantine)
        self.node = Node(self.port, self.port.node_id, transport="websocket")
        self.task: asyncio.Task | None = None

    @property
    def node_id(self) -> str:
        return self.port.node_id

    @property
    def ended(self) -> Ended | None:
        return self.task.result() if self.task is not None and self.task.done() else None


class Simulation:
    """Runs one simulated job; `run()` returns the per-round rows and the summary."""

    def __init__(self, options: SimOptions, corpus: Corpus, data_dir: Path,
                 on_round: Callable[[dict], None] | None = None, progress: "ProgressBar | None" = None):
        self.options = options
        self.corpus = corpus
        self.on_round = on_round or (lambda row: None)
        self.progress = progress or ProgressBar(False)
        rules = options.rules.read_text() if options.rules else simulation_rules()
        job = JobConfig(model=options.model, inner_steps=options.inner_steps, lr=options.lr,
                        batch=options.batch, deadline_seconds=SIM_ROUND_DEADLINE_S, rounds=options.rounds,
                        outer_lr=options.outer_lr, outer_momentum=options.outer_momentum,
                        aggregator=options.aggregator, byzantine_fraction=options.tolerated_fraction,
                        codec=options.codec, delta_codec=options.delta_codec, seed=options.seed,
                        verify_share=options.verify_share, overlap=options.overlap)
        self.coordinator = Coordinator(data_dir, job, corpus, rules_toml=rules, peers=options.peers,
                                       settle_in_background=options.background_settle)
        self._quarantined: set[str] = set()  # node ids the coordinator quarantined, as of the last round's row
        self.signaling = SignalingServer(self.coordinator)
        self.exchange = PeerExchange()  # the workers' peer links
        self.model = GPT(self.coordinator.cfg)  # every worker trains on this one module, one after another
        self.rng = random.Random(options.seed)
        self.attack_gen = torch.Generator().manual_seed(options.seed + 1)
        self.workers: list[SimWorker] = []
        self.next_index = 0
        self.refused: list[str] = []
        self.byzantine_ids: dict[str, bool] = {}  # every worker that ever joined: node id -> attacker?
        self.uplink_bytes = 0
        self.uploads: list[dict] = []  # every update sent: node_id, round, bytes, sha256
        self.trainings: list[Training] = []  # every worker's inner steps, in the order they ran
        self.released = -1  # the newest round the workers may train
        self._models: dict[str, np.ndarray] = {}
        self._applied: dict[tuple, tuple[np.ndarray, bytes]] = {}
        self._shards: dict[int, torch.Tensor] = {}
        self._honest: dict[int, dict[SimWorker, torch.Tensor]] = {}  # round -> each worker's honest update
        self._forged: dict[int, dict[int, torch.Tensor]] = {}
        self._expected: list[SimWorker] = []
        self._trained = 0
        self._ready: dict[int, set[SimPort]] = {}  # round -> the workers that hold its model and wait to train
        self._training: set[SimPort] = set()  # the workers that started training the released round
        self._fetched: dict[int, Counter] = {}  # round (as rows count it) -> how its models came: bytes by source
        self._pulse: asyncio.Future | None = None

    # -- what the workers' ports share -----------------------------------------------------------------------

    def notify(self) -> None:
        if self._pulse is not None and not self._pulse.done():
            self._pulse.set_result(None)

    async def changed(self, timeout: float | None = None) -> None:
        if self._pulse is None or self._pulse.done():
            self._pulse = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(asyncio.shield(self._pulse), timeout)

    def model_for(self, model_hash: str, data: bytes) -> np.ndarray:
        if model_hash not in self._models:  # a newer model: no worker trains on the older one again
            self._models = {model_hash: np.frombuffer(bytearray(data), "<f4")}  # writable, for torch
        return self._models[model_hash]

    def applied(self, model: np.ndarray, codec: compress.CodecSpec, data: bytes) -> tuple[np.ndarray, bytes]:
        """A round's delta applied to a held model, once for every worker that holds that model."""
        key = (id(model), hashlib.sha256(data).hexdigest())
        if key not in self._applied:
            new = apply_delta(model, codec, data)
            self._applied = {key: (new, new.tobytes())}  # a newer delta: no worker applies the older one again
        return self._applied[key]

    def shard(self, index: int) -> torch.Tensor:
        if index not in self._shards:
            corpus = self.coordinator.corpus  # the job's token ids, as its shard route serves them
            self._shards[index] = token_tensor(corpus.shard(index), corpus.vocab_size)
        return self._shards[index]

    def ready(self, port: SimPort, round_: int) -> None:
        """A worker holds round `round_`'s model and waits to train it."""
        self._ready.setdefault(round_, set()).add(port)
        self.notify()

    def may_train(self, port: SimPort, round_: int) -> bool:
        """Workers train a released round one at a time, in the order they were started, so that the coordinator
        receives the updates in the same order (and sums them to the same bits) however the models travelled."""
        if self.released < round_:
            return False
        for w in self._expected:
            if w.port is port:
                return True
            if w.port not in self._training and w.ended is None:
                return False
        return True

    def progress_worker(self, port: SimPort, round_: int) -> None:
        self._training.add(port)
        self.progress.show(round_, self.options.rounds, self._trained, len(self._expected))
        self._trained += 1
        self.notify()

    def trained(self, port: SimPort, work) -> None:
        """A worker finished its inner steps of `work` (shared.node.Work)."""
        self.trainings.append(Training(work.round, port.node_id, work.shard, work.schedule, work.seq_len))

    def fetched(self, fields: dict) -> None:
        """A worker's "model" report: how the round's model arrived, and from whom."""
        counts = self._fetched.setdefault(fields["round"], Counter())
        if fields["source"] == "link":  # in-band, over its link to the coordinator
            counts["from_coordinator"] += fields["bytes"]
        else:
            counts["from_peers"] += fields.get("from_peers", 0)
            counts["from_coordinator"] += fields.get("from_coordinator", 0)
        if fields["source"] == "delta":
            counts["delta_bytes"] = max(counts["delta_bytes"], fields["bytes"])

    async def attack(self, port: SimPort, round_: int, values: torch.Tensor) -> torch.Tensor:
        """The encode hook: honest workers send their update; attackers wait until every worker of the round has
        trained, and send what `corrupt` forges from all of them (the colluders are omniscient)."""
        worker = next((w for w in self._expected if w.port is port), None)
        if worker is None:  # quarantined, and not yet told: what it sends is refused whatever it is
            return values
        honest = self._honest.setdefault(round_, {})
        honest[worker] = values
        if not worker.byzantine:
            return values
        while len(honest) < len(self._expected):
            await self._wait_for(lambda: len(honest) >= len(self._expected), f"round {round_} honest updates")
        if round_ not in self._forged:
            o = self.options
            ordered = [honest[w] for w in self._expected]
            attackers = [i for i, w in enumerate(self._expected) if w.byzantine]
            forged = corrupt(o.attack, ordered, attackers, self.attack_gen, o.scale_factor)
            self._forged[round_] = {self._expected[i].index: v for i, v in forged.items()}
        return self._forged[round_][worker.index]

    # -- membership --------------------------------------------------------------------------------------

    def _start(self, byzantine: bool) -> SimWorker:
        worker = SimWorker(self, self.next_index, byzantine)
        self.next_index += 1
        self.byzantine_ids[worker.node_id] = byzantine
        worker.task = asyncio.create_task(worker.node.run())
        worker.task.add_done_callback(lambda _: self.notify())
        self.workers.append(worker)
        return worker

    async def _stop(self, worker: SimWorker) -> None:
        worker.node.stop()
        self.notify()
        await self._wait_for(lambda: worker.task.done(), f"worker {worker.index} to leave")
        self.workers.remove(worker)

    async def _wait_for(self, condition: Callable[[], bool], what: str, job_done: bool = False) -> None:
        """Wait until `condition()`; raise when the coordinator stopped first (unless the job is `job_done`) or nothing
        changed for WAIT_TIMEOUT_S."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not condition():
            if self._task.done() and not job_done:
                self._task.result()  # the coordinator's own exception, if it raised one
                raise SimulationError(f"the coordinator stopped while the simulation waited for {what}")
            try:
                await self.changed(min(1.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise SimulationError(f"no progress in {WAIT_TIMEOUT_S:.0f}s waiting for {what}") from None

    # -- the run -------------------------------------------------------------------------------------------------

    async def run(self) -> tuple[list[dict], dict]:
        o = self.options
        started = time.monotonic()
        self._task = asyncio.create_task(self.coordinator.run())
        self._task.add_done_callback(lambda _: self.notify())
        roles = [True] * o.attackers + [False] * (o.workers - o.attackers)
        self.rng.shuffle(roles)
        for byzantine in roles:
            self._start(byzantine)
        history = self.coordinator.status()["history"]
        rows = [self._row(history[0], 0, 0, Counter(), 0, 0.0)]
        self.on_round(rows[0])
        try:
            for r in range(o.rounds):
                rows.append(await self._round(r))
                self.on_round(rows[-1])
            await self._wait_for(lambda: self._task.done(), "the job to finish")
            self._task.result()
            await self._wait_for(lambda: all(w.task.done() for w in self.workers), "the workers to leave", job_done=True)
        finally:
            for task in [self._task] + [w.task for w in self.workers]:
                if not task.done():
                    task.cancel()
        return rows, self._summary(rows, time.monotonic() - started)

    def _live(self) -> list[SimWorker]:
        """The workers still in the run: not ended, and not quarantined (a removal they may not have heard yet)."""
        return [w for w in self.workers if w.ended is None and w.node_id not in self._quarantined]

    async def _round(self, r: int) -> dict:
        o = self.options
        round_started = time.monotonic()
        uplink_before = self.uplink_bytes
        await self._wait_for(lambda: not self._live() or all(w.port.assigned == r for w in self._live()),
                             f"round {r} assignments")
        workers = self._live()
        if not workers:
            ended = {str(w.ended) for w in self.workers}
            raise SimulationError(f"round {r}: no worker is left (refused joins: {self.refused or 'none'}; "
                                  f"ended: {ended or 'none'})")
        # every model is fetched before anyone trains: training blocks the event loop, and a worker's wall-clock
        # wait for its peers (shared/swarm.py PEER_WAIT_S) must not count another worker's training time
        ready = self._ready.setdefault(r, set())
        await self._wait_for(lambda: all(w.port in ready or w.ended for w in workers), f"round {r} models")
        self._expected, self._trained, self._training = workers, 0, set()
        self.released = r
        self.notify()
        await self._wait_for(lambda: all(r in w.port.results or w.ended for w in workers), f"round {r} verdicts")
        await self._wait_for(lambda: self.coordinator.committed_rounds() > r and self.coordinator.settling is None,
                             f"round {r} to settle")
        honest = self._honest.pop(r, {})
        self._forged.pop(r, None)
        self._ready.pop(r, None)
        for w in workers:
            bad = [f["message"] for e, f in w.port.events if e == "notice" and "receipt" in f["message"]]
            if bad:
                raise SimulationError(f"the coordinator sent {w.node_id[:12]} a bad receipt: {bad[0]}")
        verdicts = [w.port.results[r] for w in workers if r in w.port.results]
        rejected_by = Counter(rule for v in verdicts if not v["accepted"] for rule in v["rule"].split(","))
        history = self.coordinator.status()["history"][-1]
        # the coordinator's decisions when the round settled (its workers see their removal when they next listen)
        quarantined = len(set(self.coordinator.policy.quarantined) - self._quarantined)
        self._quarantined |= set(self.coordinator.policy.quarantined)
        await asyncio.sleep(0)
        for w in list(self.workers):
            if w.ended is not None:
                self.workers.remove(w)
        joined = left = 0
        if o.churn and r + 1 < o.rounds:
            leaving = self.rng.sample(self.workers, min(len(self.workers), round(o.churn * len(self.workers))))
            for w in leaving:
                await self._stop(w)
                left += 1
                self._start(w.byzantine)
                joined += 1
        row = self._row(history, joined, left, rejected_by, self.uplink_bytes - uplink_before,
                        time.monotonic() - round_started)
        row.update(workers=len(workers), attackers=sum(w.byzantine for w in workers), quarantined=quarantined,
                   honest_norm=float(torch.stack([g.norm() for g in honest.values()]).mean()) if honest else 0.0)
        self.progress.show(r + 1, o.rounds, len(workers), len(workers), row["val_loss"])
        return row

    def _row(self, h: dict, joined: int, left: int, rejected_by: Counter, uplink: int, seconds: float) -> dict:
        fetched = self._fetched.pop(h["round"], Counter())
        return {"round": h["round"], "val_loss": h["val_loss"], "accepted": h["accepted"], "rejected": h["rejected"],
                "bytes": h["bytes"], "uplink_bytes": uplink, "workers": len(self.workers), "attackers": 0,
                "joined": joined, "left": left, "quarantined": 0, "honest_norm": 0.0, "rejected_by": dict(rejected_by),
                # what the coordinator sent while the round was open (links and blobs), and how the round's models
                # reached the workers: model bytes from peers and from the coordinator; the round's delta's size
                "coordinator_bytes_out": h.get("coordinator_bytes_out", 0),
                "model_bytes_from_peers": fetched["from_peers"],
                "model_bytes_from_coordinator": fetched["from_coordinator"], "delta_bytes": fetched["delta_bytes"],
                "model_hash": h.get("model_hash"), "seconds": round(seconds, 3)}

    def _summary(self, rows: list[dict], seconds: float) -> dict:
        played = rows[1:]
        accepted = sum(r["accepted"] for r in played)
        rejected_by: Counter = Counter()
        for r in played:
            rejected_by.update(r["rejected_by"])
        tokens = sum(t.tokens for t in self.trainings)
        steps = sum(t.steps for t in self.trainings)
        update_bytes = sum(u["bytes"] for u in self.uploads)
        return {"final_val_loss": rows[-1]["val_loss"], "initial_val_loss": rows[0]["val_loss"],
                # uploads per token trained, against synchronous data parallel's on the same tokens: one fp32
                # gradient of every parameter per inner step
                "tokens_trained": tokens, "inner_steps_trained": steps, "update_bytes": update_bytes,
                "bytes_per_token": update_bytes / max(1, tokens),
                "ddp_bytes_per_token": BYTES_PER_FP32 * self.coordinator.n_params * steps / max(1, tokens),
                "bytes_per_round": sum(r["bytes"] for r in played) / len(played),
                "bytes_per_update": sum(r["bytes"] for r in played) / max(1, accepted),
                "uplink_bytes_per_round": sum(r["uplink_bytes"] for r in played) / len(played),
                "coordinator_bytes_out_per_round": sum(r["coordinator_bytes_out"] for r in played) / len(played),
                "model_bytes_from_peers": sum(r["model_bytes_from_peers"] for r in played),
                "model_bytes_from_coordinator": sum(r["model_bytes_from_coordinator"] for r in played),
                "final_model_hash": rows[-1]["model_hash"],
                "accepted": accepted, "rejected": sum(r["rejected"] for r in played),
                "rejected_by": dict(rejected_by), "quarantined": sum(r["quarantined"] for r in played),
                "refused_joins": len(self.refused), "rounds": len(played), "params": self.coordinator.n_params,
                "reputation": self._reputation(),
                "seconds": round(seconds, 2),
                # from the last update a round decided to the next round's opening (the commit's critical path)
                "turnaround_seconds": list(self.coordinator.turnarounds),
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()}}

    def _reputation(self) -> dict:
        """The coordinator's mean reputation of the honest workers and of the attackers (None: there were none),
        over every worker that ever joined: discarded, rejected and slashed updates lower it."""
        scores = {True: [], False: []}
        for node_id, byzantine in self.byzantine_ids.items():
            scores[byzantine].append(self.coordinator.governor.reputation[node_id])
        return {"honest": sum(scores[False]) / len(scores[False]) if scores[False] else None,
                "attackers": sum(scores[True]) / len(scores[True]) if scores[True] else None}


def simulation_rules() -> str:
    """The default rulebook with the join-rate cap lifted (see JOIN_RULE_SIMULATED)."""
    text = (Path(compress.__file__).parent / "default_rules.toml").read_text()
    for default, simulated in ((JOIN_RULE_DEFAULT, JOIN_RULE_SIMULATED), (DEADLINE_RULE_DEFAULT, DEADLINE_RULE_SIMULATED)):
        if default not in text:
            raise SimulationError(f"shared/default_rules.toml no longer has {default}, which the simulator "
                                  "replaces; update server/sim/__init__.py")
        text = text.replace(default, simulated)
    return text


# -- outputs -------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("round", "val_loss", "accepted", "rejected", "bytes", "uplink_bytes", "workers", "attackers",
               "joined", "left", "quarantined", "honest_norm", "coordinator_bytes_out", "model_bytes_from_peers",
               "model_bytes_from_coordinator", "delta_bytes", "seconds")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never ask for a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["round"] for r in rows], [r["val_loss"] for r in rows], marker="o")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def describe(o: SimOptions) -> str:
    attack = f"{o.attackers} {o.attack} attacker(s)" if o.attackers else "no attackers"
    mesh = f"{o.peers} peer links each" if o.peers else "star (no peer links)"
    return (f"{o.workers} workers, {attack}, {o.aggregator}, {o.codec}, churn {o.churn:g}, H={o.inner_steps}, "
            f"batch {o.batch}, {mesh}, {'overlapped rounds, ' if o.overlap else ''}seed {o.seed}")


class ProgressBar:
    """A bar on stderr: redrawn in place on a terminal, one line per round otherwise. Never on stdout."""

    WIDTH = 30

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def show(self, done_rounds: int, rounds: int, worker: int, workers: int, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        partial = 0.0 if val_loss is not None else worker / max(1, workers)  # a round just closed: no partial
        fraction = min(1.0, (done_rounds + partial) / rounds)
        filled = int(self.WIDTH * fraction)
        loss = "" if val_loss is None else f" | val loss {val_loss:.4f}"
        bar = "#" * filled + "." * (self.WIDTH - filled)
        text = f"[{bar}] round {done_rounds}/{rounds} | worker {worker}/{workers}{loss}"
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if done_rounds == rounds and val_loss is not None else ""))
            self.stream.flush()
        elif val_loss is not None:
            print(text, file=self.stream, flush=True)


@dataclass
class SimulationResult:
    rows: list[dict]
    summary: dict
    csv_path: Path | None
    png_path: Path | None
    uploads: list[dict]  # every update a worker sent: node_id, round, bytes, sha256, model_hash (it trained on)
    trainings: list[Training]  # every worker's inner steps, in the order they ran


def run_simulation(options: SimOptions, on_round: Callable[[dict], None] | None = None,
                   progress: bool = False) -> SimulationResult:
    """Run one simulated job in a fresh temporary data directory; write the CSV and PNG when options.out is set."""
    torch.set_num_threads(options.threads)
    try:
        corpus = load_corpus(options.data, options.corpus_bytes)
    except CorpusError as e:
        raise SimulationError(str(e)) from e
    with tempfile.TemporaryDirectory(prefix="swarmgrad-sim-") as tmp:
        try:
            sim = Simulation(options, corpus, Path(tmp), on_round, ProgressBar(progress))
        except (GovernanceError, OSError) as e:
            raise SimulationError(f"cannot start the simulated coordinator: {e}") from e
        try:
            rows, summary = asyncio.run(sim.run())
        finally:
            sim.coordinator.store.close()
    csv_path = png_path = None
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = options.out / "rounds.csv", options.out / "val_loss.png"
        write_csv(csv_path, rows)
        write_plot(png_path, rows, describe(options))
        summary.update(csv=str(csv_path), png=str(png_path))
    return SimulationResult(rows, summary, csv_path, png_path, sim.uploads, sim.trainings)


# -- command line --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    d = SimOptions()
    p = argparse.ArgumentParser(prog="python -m server simulate", description=(
        "Simulate a swarm in one process: the real coordinator (signaling, rounds, governance, ledger, aggregation, "
        "codecs) and N simulated workers that run the trainer's own node code (torch CPU, real corpus shards, signed "
        "updates) over in-process sockets, with attackers and churn. Writes a CSV and a PNG of the validation loss per round into --out."))
    p.add_argument("--workers", type=int_at_least(1), default=d.workers, help="simulated workers (default: %(default)s)")
    p.add_argument("--byzantine", type=fraction(MAX_BYZANTINE), default=d.byzantine, metavar="FRACTION",
                   help="share of workers that attack, in [0, 0.5) (default: %(default)s)")
    p.add_argument("--attack", choices=ATTACKS, default=d.attack,
                   help="signflip: -g; noise: Gaussian at the honest norm; scale: g x --scale-factor; alie: "
                        "mean - z std of the honest updates (Baruch et al. 2019) (default: %(default)s)")
    p.add_argument("--aggregator", choices=tuple(aggregation.RULES), default=d.aggregator,
                   help="the job's aggregation rule, a governed parameter (default: %(default)s)")
    p.add_argument("--codec", type=codec_option, default=d.codec, metavar="CODEC",
                   help=CODEC_HELP + " (default: %(default)s)")
    p.add_argument("--delta-codec", type=codec_option, default=d.delta_codec, metavar="CODEC",
                   help="how each round's model change travels to the workers, as with the coordinator's option "
                        "(default: %(default)s)")
    p.add_argument("--churn", type=fraction(1.0), default=d.churn, metavar="FRACTION",
                   help="share of workers replaced by new ones after each round (default: %(default)s)")
    p.add_argument("--rounds", type=int_at_least(1), default=d.rounds, help="rounds to run (default: %(default)s)")
    p.add_argument("--inner-steps", type=int_at_least(1), default=d.inner_steps,
                   help="local AdamW steps per round, H (default: %(default)s)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int_at_least(1), default=d.batch,
                   help="sequences per inner step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="inner AdamW learning rate (default: %(default)s)")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr,
                   help="outer Nesterov learning rate (default: %(default)s)")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="outer Nesterov momentum (default: %(default)s)")
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default=d.model, help="model size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the model, the worker keys (so their batches) and the attackers (default: %(default)s)")
    p.add_argument("--tolerate", type=fraction(MAX_BYZANTINE), default=None, metavar="FRACTION",
                   help="the share f of updates robust rules are told to tolerate (default: the larger of 0.25 and "
                        "the attackers' share)")
    p.add_argument("--scale-factor", type=float, default=d.scale_factor,
                   help="the scale attack's factor (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where rounds.csv and val_loss.png go "
                                                                   "(default: %(default)s)")
    p.add_argument("--data", type=Path, default=None,
                   help="a text corpus: a file or a directory (default: the Python standard library's source)")
    p.add_argument("--corpus-bytes", type=int_at_least(1), default=d.corpus_bytes,
                   help="read at most this many bytes of the corpus; shards wrap around (default: %(default)s)")
    p.add_argument("--rules", type=Path, default=None,
                   help="a rulebook TOML for the job (default: shared/default_rules.toml with the joins-per-minute "
                        "cap lifted, since simulated minutes hold many rounds)")
    p.add_argument("--verify-share", type=share_option, default=d.verify_share, metavar="SHARE",
                   help="the share of updates the coordinator re-executes (spot checks), as with the coordinator's "
                        "option; 0 here by default, so that the aggregation rule meets the attackers "
                        "(default: %(default)s)")
    p.add_argument("--peers", type=int_at_least(0), default=d.peers, metavar="K",
                   help="peer links the coordinator (as tracker) advises each worker to open: workers fetch model "
                        "chunks from each other first, over in-process links, with the node's own mesh code; 0 is "
                        "the star, every byte from the coordinator (default: %(default)s, as the coordinator's)")
    p.add_argument("--overlap", action="store_true",
                   help="overlapped rounds, as the coordinator's option: workers train round r+1 on the model before "
                        "round r's aggregate, which steps the model one round later")
    p.add_argument("--threads", type=int_at_least(1), default=d.threads,
                   help="torch CPU threads; workers run one after another (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per round and a final summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="the coordinator's log level on stderr (default: %(default)s)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("swarmgrad").setLevel(args.log_level)
    try:
        options = SimOptions(workers=args.workers, byzantine=args.byzantine, attack=args.attack,
                             aggregator=args.aggregator, codec=args.codec, delta_codec=args.delta_codec,
                             churn=args.churn, rounds=args.rounds,
                             inner_steps=args.inner_steps, batch=args.batch, lr=args.lr,
                             outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, model=args.model,
                             seed=args.seed, tolerate=args.tolerate, scale_factor=args.scale_factor, out=args.out,
                             data=args.data, corpus_bytes=args.corpus_bytes, rules=args.rules, threads=args.threads,
                             verify_share=args.verify_share, peers=args.peers, overlap=args.overlap)
    except SimulationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def on_round(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["round"] == 0:
            print(f"simulating {describe(options)}\nround 0: validation loss {row['val_loss']:.4f}", flush=True)
        else:
            rejected = f" ({', '.join(f'{k} {v}' for k, v in row['rejected_by'].items())})" if row["rejected"] else ""
            print(f"round {row['round']}: validation loss {row['val_loss']:.4f}, {row['accepted']} accepted, "
                  f"{row['rejected']} rejected{rejected}, {row['bytes']:,} bytes; the coordinator sent "
                  f"{row['coordinator_bytes_out']:,}, models came {row['model_bytes_from_peers']:,} bytes from peers "
                  f"and {row['model_bytes_from_coordinator']:,} from the coordinator", flush=True)

    try:
        result = run_simulation(options, on_round, progress=not args.no_progress)
    except SimulationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    if args.json:
        print(json.dumps(s), flush=True)
    else:
        fetched = s["model_bytes_from_peers"] + s["model_bytes_from_coordinator"]
        print(f"final validation loss {s['final_val_loss']:.4f} (from {s['initial_val_loss']:.4f}), "
              f"{s['bytes_per_round']:,.0f} bytes per round, {s['accepted']} accepted, {s['rejected']} rejected, "
              f"{s['seconds']:.1f}s\nthe coordinator sent {s['coordinator_bytes_out_per_round']:,.0f} bytes per round; "
              f"{s['model_bytes_from_peers'] / max(1, fetched):.0%} of the model bytes came from peers\n"
              f"workers sent {s['bytes_per_token']:.3f} update bytes per token trained; fp32 data parallel would "
              f"send {s['ddp_bytes_per_token']:.3f} (x{s['ddp_bytes_per_token'] / max(s['bytes_per_token'], 1e-12):.1f})\n"
              f"wrote {s.get('csv')} and {s.get('png')}", flush=True)
    return 0
