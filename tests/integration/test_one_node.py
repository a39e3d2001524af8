"""The simulator runs the node the trainer runs (shared/node.py): given the same key, seed, corpus and assignment,
a simulated worker and a real `python -m server trainer` process send byte-identical update payloads."""

from __future__ import annotations

import hashlib
import random
import re

from server.sim import SimOptions, run_simulation
from server.sim.worker import worker_key

JOB = {"inner_steps": 3, "batch": 4, "lr": 2e-3, "seed": 7}


def corpus_file(path):
    rng = random.Random(1)
    words = ["round", "node", "model", "update", "shard", "peer", "signed", "delta", "chunk", "vote"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(20_000)))
    return path


def test_a_simulated_worker_and_a_trainer_process_send_the_same_update_bytes(processes, loopback_namespace,
                                                                               tmp_path):
    data = corpus_file(tmp_path / "corpus.txt")
    key_file = tmp_path / "node.key"
    key_file.write_bytes(hashlib.sha256(f"swarmgrad-sim:{JOB['seed']}:0".encode()).digest())  # worker 0's key

    coordinator = processes.coordinator("--data", str(data), "--inner-steps", str(JOB["inner_steps"]),
                                        "--batch", str(JOB["batch"]), "--lr", str(JOB["lr"]),
                                        "--seed", str(JOB["seed"]), "--rounds", "1", "--verify-share", "0")
    coordinator.wait_ready()
    trainer = processes.trainer(coordinator.url, "--key-file", str(key_file), "--log-level", "INFO",
                                env={"OMP_NUM_THREADS": "1"})  # one thread, as the simulator trains
    assert trainer.wait(240) == 0, trainer.output()
    sent = re.findall(r"round 1: uploaded (\d+) bytes, sha256 ([0-9a-f]{64})", trainer.output())
    assert len(sent) == 1, trainer.output()

    result = run_simulation(SimOptions(workers=1, rounds=1, data=data, out=None, **JOB))
    (worker,) = result.uploads
    assert worker["node_id"] == worker_key(JOB["seed"], 0).node_id
    assert (worker["bytes"], worker["sha256"]) == (int(sent[0][0]), sent[0][1])
    assert result.summary["accepted"] == 1
