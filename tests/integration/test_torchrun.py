"""Real processes: a trainer node of two torchrun ranks (gloo, on the CPU) against a real coordinator."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.conftest import ROOT, Process, free_port

RANKS = 2
# what every rank logs after a round (server.distributed.Rank.run)
ROUND_LINE = re.compile(r"rank (\d+)/2: round (\d+): (\d+) steps on rows (\d+)-(\d+) of (\d+); parameters digest "
                        r"([0-9a-f]{16})")
STOP_LINE = re.compile(r"rank (\d+)/2: round (\d+): stopped with the other ranks after step (\d+) of (\d+)")


@pytest.fixture
def torchrun(tmp_path):
    """Start `torchrun --nproc-per-node 2 TARGET ARGS` (TARGET: `-m server` or a script); stopped after the test."""
    started: list[Process] = []

    def start(*target: str, env: dict | None = None) -> Process:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *target]
        p = Process(args, tmp_path / f"torchrun-{len(started)}.log", env={"PYTHONPATH": str(ROOT), **(env or {})})
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def stored_updates(coordinator) -> list[tuple]:
    with coordinator.read_store() as books:
        return [(u.round, u.node_id, u.accepted, u.reason) for u in books.updates()]


def test_two_ranks_train_as_one_node_whose_updates_reproduce_under_spot_checks(processes, torchrun,
                                                                                loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "6", "--batch", "8", "--deadline-seconds", "90",
                                        "--verify-share", "1")  # every update re-executed by one process
    seq_len = coordinator.wait_ready()["job"]["config"]["block_size"]
    node = torchrun("-m", "server", "trainer", "--coordinator", coordinator.url, "--max-rounds", "3",
                    "--no-progress")
    assert node.wait(300) == 0, node.output()  # every rank left cleanly
    status = coordinator.wait_for(lambda s: s["round"] >= 3, 60, "three committed rounds")

    (seen,) = status["nodes"]  # the ranks joined as one node
    assert seen["kind"] == "trainer" and seen["updates_accepted"] == 3
    assert f"x{RANKS} ranks (ddp)" in seen["agent"]
    rows = stored_updates(coordinator)
    assert [(r[0], r[2]) for r in rows] == [(0, 1), (1, 1), (2, 1)], rows  # all accepted, none overruled
    ledger = coordinator.status_of("/api/ledger?limit=1000")["entries"]
    assert [e["kind"] for e in ledger if e["node"] == seen["id"]].count("grant") == 1  # its work was re-executed
    assert "could not run" not in coordinator.output()  # ... and every spot check ran
    assert "rank 0/2: the node left the coordinator (exit code 0)" in node.output()
    assert "rank 1/2: rank 0 says leave" in node.output()

    trained = {}
    for rank, round_, steps, lo, hi, batch, digest in ROUND_LINE.findall(node.output()):
        trained[int(round_), int(rank)] = (int(steps), (int(lo), int(hi)), int(batch), digest)
    assert sorted(trained) == [(r, k) for r in (1, 2, 3) for k in range(RANKS)]
    history = status["history"]
    for r in (1, 2, 3):
        (steps, first, batch, digest), (steps_1, second, batch_1, digest_1) = trained[r, 0], trained[r, 1]
        assert digest == digest_1  # both ranks hold the same parameters after the round
        assert first == (0, batch // 2) and second == (batch // 2, batch) and batch == batch_1 == 8
        assert steps == steps_1
        assert history[r]["tokens"] == steps * batch * seq_len  # tokens and H count the whole node
    assert len({trained[r, 0][3] for r in (1, 2, 3)}) == 3  # (and they moved every round)
    assert history[3]["val_loss"] < history[0]["val_loss"] - 0.5, history


# A rank program: one round through server.distributed's ranks against one process's inner_steps, for each case
EQUIVALENCE = """
import json, sys
import torch
from server import distributed
from server.coordinator.spot_check import judge
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters
from server.training import byte_tensor, inner_steps
from shared.batches import batch_starts
from shared.compress import CodecSpec
from shared.model import MODEL_SIZES
from shared.node import Work

cfg, steps, seq_len, lr, weight_decay = MODEL_SIZES["tiny"], 4, 32, 3e-3, 0.1
ranks = distributed.Ranks.join("cpu")
results = []
for parallel, batch in json.loads(sys.argv[2]):
    if ranks.rank:
        distributed.follow(ranks, parallel)
        continue
    model = GPT(cfg)
    init_parameters(model, 3)
    start = flat_parameters(model).numpy()
    shard = byte_tensor(open(sys.argv[3], "rb").read())
    schedule = batch_starts(shard.numel(), steps, batch, seq_len, 7)
    leader = distributed.Leader(ranks, parallel)
    leader.prepare(cfg)
    work = Work(0, steps, batch, seq_len, lr, weight_decay, schedule, shard, start,
                CodecSpec.from_dict({"name": "fp32"}))
    losses = leader.train(work)
    update = start - leader.trained().numpy()
    leader.close()
    alone = GPT(cfg)
    load_flat_parameters(alone, torch.from_numpy(start))
    alone_losses = inner_steps(alone, shard, schedule, seq_len, lr, weight_decay)
    verdict = judge(update, start - flat_parameters(alone).numpy(), {"name": "fp32"})
    results.append({"parallel": parallel, "batch": batch, "ok": verdict.ok, "cosine": verdict.cosine,
                    "relative_error": verdict.relative_error, "losses": losses, "alone": alone_losses})
if ranks.rank == 0:
    open(sys.argv[1], "w").write(json.dumps(results))
ranks.leave()
"""


def test_a_ranks_update_is_the_one_process_update_for_ddp_fsdp_and_uneven_rows(torchrun, tmp_path,
                                                                                loopback_namespace):
    program, out, shard = tmp_path / "equivalence.py", tmp_path / "results.json", tmp_path / "shard.bin"
    program.write_text(EQUIVALENCE)
    shard.write_bytes(b"".join(f"line {i}: the quick brown fox\n".encode() for i in range(2000)))
    # 8 rows: 4 a rank; 3 rows: 1 and 2 (weighted by share); 1 row: rank 1 joins each step at weight 0
    cases = [["ddp", 8], ["ddp", 3], ["ddp", 1], ["fsdp", 8]]
    ranks = torchrun(str(program), str(out), json.dumps(cases), str(shard))
    assert ranks.wait(300) == 0, ranks.output()

    results = json.loads(out.read_text())
    assert [[r["parallel"], r["batch"]] for r in results] == cases
    for r in results:
        assert r["ok"], r  # the spot check's own judgement
        assert r["cosine"] > 1 - 1e-6 and r["relative_error"] < 1e-3, r  # float reduction order, nothing more
        assert r["losses"] == pytest.approx(r["alone"], abs=1e-5), r
    assert results[0]["losses"][-1] < results[0]["losses"][0]


# A trainer whose every optimizer step takes at least 0.2 s (a sleep before it, in every rank: it changes none of the
# numbers), and that notes each rank's first step in a file: a round of 400 steps lasts over a minute, so a signal
# sent once both ranks have stepped lands mid-round by construction
SLOW_RANKS = """
import os, sys, time
from torch.optim.optimizer import register_optimizer_step_pre_hook

def slow(optimizer, args, kwargs, first=[True]):
    if first:
        first.clear()
        with open(os.environ["STEPPED_FILE"], "a") as f:
            f.write(os.environ["RANK"] + "\\n")
    time.sleep(0.2)

register_optimizer_step_pre_hook(slow)
from server.cli import main
sys.exit(main())
"""


def test_ctrl_c_stops_every_rank_at_the_same_step_and_the_node_leaves(processes, torchrun, tmp_path,
                                                                       loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "400", "--batch", "4", "--deadline-seconds", "600",
                                        "--verify-share", "0")
    coordinator.wait_ready()
    program, stepped = tmp_path / "slow_ranks.py", tmp_path / "stepped"
    program.write_text(SLOW_RANKS)
    node = torchrun(str(program), "trainer", "--coordinator", coordinator.url, "--no-progress",
                    env={"STEPPED_FILE": str(stepped)})
    deadline = time.time() + 180
    while not (stepped.exists() and sorted(stepped.read_text().split()) == ["0", "1"]):
        assert node.proc.poll() is None and time.time() < deadline, node.output()
        time.sleep(0.2)

    node.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends torchrun; it forwards the signal to every rank
    node.wait(120)
    output = node.output()
    stops = {int(rank): (int(round_), int(step), int(steps)) for rank, round_, step, steps in STOP_LINE.findall(output)}
    assert sorted(stops) == list(range(RANKS)), output
    assert len(set(stops.values())) == 1, stops  # the same round, the same step
    round_, step, steps = stops[0]
    assert round_ == 1 and step < steps == 400
    assert "rank 0/2: the node left the coordinator (exit code 0)" in output  # rank 0 said goodbye, then ended
    assert "telling the other ranks" not in output  # they had stopped with it: nothing more to tell them
    assert "forcefully exiting" not in output  # torchrun did not have to kill a rank that hung
    assert stored_updates(coordinator) == []  # no update from a round cut short
    status = coordinator.wait_for(lambda s: [n["state"] for n in s["nodes"]] == ["offline"], 30, "the node gone")
    assert status["nodes"][0]["updates_accepted"] == 0


def test_a_world_size_that_is_not_a_number_is_a_clear_error(tmp_path):
    trainer = Process(["-m", "server", "trainer", "--coordinator", "http://127.0.0.1:9"], tmp_path / "trainer.log",
                      env={"WORLD_SIZE": "two"})
    assert trainer.wait(60) == 2
    trainer.stop()
    assert "error: WORLD_SIZE='two' is not a number of ranks; start ranks with torchrun" in trainer.output()
