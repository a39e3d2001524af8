"""The peer mesh (shared/swarm.py, server/coordinator/tracker.py) between real trainer processes: advised by the
coordinator as tracker, they open WebRTC data channels to each other through the signaling relay and fetch the
model's chunks from each other first, while the coordinator seeds each chunk about once. A peer that serves a
damaged chunk is caught, banned and routed around, and the round commits with the right model everywhere."""

from __future__ import annotations

import re

MODEL_LINE = re.compile(r"round (\d+): model (fetched as|updated by a delta of) (\d+) chunks \((\d+) bytes\): "
                        r"(\d+) bytes from peers, (\d+) from the coordinator; model ([0-9a-f]{64})")

# `python -c` program: a trainer whose peer links send every blob with its last byte flipped (and so under a name that
# is not the sha256 of what it sends), while it trains honestly, slowly (a sleep before each step: round 1 stays open
# until the others have joined and asked it for chunks)
DAMAGING_PEER = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_pre_hook
register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(1.5))
import shared.swarm
real = shared.swarm.payload_frames
def damaged(transfer_id, kind, data, meta=None):
    data = bytes(data)
    return real(transfer_id, kind, data[:-1] + bytes([data[-1] ^ 1]), meta)
shared.swarm.payload_frames = damaged
from server.cli import main
sys.exit(main())
"""


def model_lines(log: str) -> dict[int, tuple]:
    """round -> (how, chunks, bytes, from peers, from the coordinator, model hash), from a trainer's log"""
    return {int(m[0]): (m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]), m[6]) for m in MODEL_LINE.findall(log)}


def test_trainers_fetch_chunks_from_each_other_and_hold_the_coordinators_model(processes, loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "6", "--batch", "8", "--rounds", "3", "--verify-share", "0",
                                        "--peers", "3", "--deadline-seconds", "120", "--delta-codec", "fp32")
    coordinator.wait_ready()
    # patient peers: every chunk has a seed that offers it, so none may come from the coordinator by a timeout
    trainers = [processes.trainer(coordinator.url, "--log-level", "INFO", peer_wait_seconds=300) for _ in range(3)]
    for t in trainers:
        assert t.wait(300) == 0, t.output()
    final = coordinator.wait_for(lambda s: s["state"] == "finished", 30, "the job to finish")
    history = final["history"]
    assert [h["accepted"] for h in history] == [0, 3, 3, 3]
    lines = [model_lines(t.output()) for t in trainers]
    delta_bytes = lines[0][2][2]
    for got in lines:
        assert sorted(got) == [1, 2, 3]
        for r, (how, _, size, from_peers, from_coordinator, model_hash) in got.items():
            assert model_hash == history[r - 1]["model_hash"]  # every node holds the coordinator's model
            if r > 1:  # a current node gets only the delta, from peers or the coordinator
                assert how == "updated by a delta of" and size == delta_bytes
                assert from_peers + from_coordinator <= size + 4096  # the chunks, plus a manifest at most
    assert sum(got[r][3] for got in lines for r in got) > 0  # chunks went from node to node
    nodes = final["nodes"]
    assert len(nodes) == 3 and sum(n["bytes_from_peers"] for n in nodes) > 0
    # the coordinator seeds each chunk about once: in rounds 2 and 3 it sends about one delta, not one per node
    for h in history[2:]:
        assert h["coordinator_bytes_out"] < 2 * delta_bytes, (h, delta_bytes)
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_a_peer_serving_damaged_chunks_is_banned_and_routed_around(processes, loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--rounds", "2", "--verify-share", "0",
                                        "--peers", "3", "--deadline-seconds", "120", "--delta-codec", "fp32")
    coordinator.wait_ready()
    liar = processes.trainer(coordinator.url, "--log-level", "INFO", progress=True, program=DAMAGING_PEER)
    # the liar joins first and alone, so it holds every chunk of round 1's model when the others come and ask
    coordinator.wait_for(lambda s: any(n["state"] == "training" for n in s["nodes"]), 60, "the first node to train")
    honest = [processes.trainer(coordinator.url, "--log-level", "INFO") for _ in range(2)]
    for t in (liar, *honest):
        assert t.wait(300) == 0, t.output()
    final = coordinator.wait_for(lambda s: s["state"] == "finished", 30, "the job to finish")
    (liar_id,) = set(re.findall(r"joined \S+ as ([0-9a-f]{12})…", liar.output()))
    for t in honest:
        banned = re.findall(r"peer ([0-9a-f]{12})… sent a blob that (?:does not match its hash|was not asked for)",
                            t.output())
        assert banned and set(banned) == {liar_id}, t.output()[-3000:]  # caught, once: it is not asked again
    history = final["history"]
    assert all(h["accepted"] >= 1 for h in history[1:])  # the rounds commit
    assert sum(n["updates_accepted"] for n in final["nodes"]) == sum(h["accepted"] for h in history)
    assert all(n["updates_accepted"] >= 1 for n in final["nodes"])  # the honest nodes' work counted
    for t in honest:
        for r, line in model_lines(t.output()).items():
            assert line[5] == history[r - 1]["model_hash"]  # the right model everywhere
