"""shared/node.py, the one round flow every node runs, against a scripted coordinator that speaks the real wire
frames: reconnect with backoff, the job's end, quarantine, a rejected update and a non-finite update.

The port under test is the torch trainer's own (server/trainer.py's TorchPort: real model, real inner steps, real
codec with error feedback); only its links are scripted, so what these tests see is what `python -m server trainer`
does.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from server.coordinator.blobs import BlobStore
from server.keys import NodeKey
from server.model import GPT, flat_parameters, init_parameters
from server.trainer import EXIT_CODES, Progress, TorchPort
from server.training import byte_tensor
from shared.model import model_config, num_parameters
from shared.node import RECONNECT_MAX_S, RECONNECT_MIN_S, Disconnected, Ended, JobFinished, Node, NodePort, Phase, \
    Refused
from shared.wire import (Bye, Challenge, Error, FrameReceiver, Hello, ModelRequest, PathSelect, RoundClosed,
                         RoundOpen, Update, UpdateResult, Welcome, decode_message, payload_frames)

COORDINATOR = "c" * 64
CFG = model_config("tiny")
N_PARAMS = num_parameters(CFG)
CONFIG = {"inner_steps": 2, "lr": 1e-3, "weight_decay": 0.0, "batch": 2, "seq_len": CFG.block_size,
          "codec": {"name": "fp32"}, "deadline_seconds": 60.0}


def initial_model() -> np.ndarray:
    model = GPT(CFG)
    init_parameters(model, 0)
    return flat_parameters(model).numpy().copy()


class ScriptedCoordinator:
    """The coordinator's side of one node's links: answers the handshake, serves models by hash, judges updates
    with `verdict(update)` and sends `script[r]` after the verdict of round r. Signatures are not checked here:
    tests/integration covers them against the real coordinator."""

    def __init__(self, models: dict[int, np.ndarray], verdict=lambda u: UpdateResult(u.round, True), rounds=2,
                 welcome_error: Error | None = None):
        self.models = {r: np.ascontiguousarray(m, "<f4").tobytes() for r, m in models.items()}
        self.hashes = {r: payload_frames(0, "model", b)[0].sha256 for r, b in self.models.items()}
        self.verdict, self.rounds, self.welcome_error = verdict, rounds, welcome_error
        self.updates: list[tuple[Update, bytes]] = []
        self.receiver = FrameReceiver(8 * N_PARAMS)
        self.byes: list[Bye] = []

    def attach(self, node: Node) -> None:
        self.node = node
        node.feed("signaling", Challenge("a" * 64, COORDINATOR).encode())

    def open_round(self, r: int) -> None:
        self.node.feed("signaling", RoundOpen(r, self.hashes[r], "0" * 128, CONFIG, 0, 0.0).encode())

    def hear(self, frame: str | bytes) -> None:
        item = self.receiver.feed(frame)
        if isinstance(item, Hello):
            reply = self.welcome_error or Welcome(item.node_id, COORDINATOR, {"config": CFG.to_dict(),
                                                                              "params": N_PARAMS, "model": "tiny"}, 0)
            self.node.feed("signaling", reply.encode())
        elif isinstance(item, PathSelect):
            self.open_round(0)
        elif isinstance(item, ModelRequest):
            r = next(r for r, h in self.hashes.items() if h == item.model_hash)
            header, chunks = payload_frames(1, "model", self.models[r])
            self.node.feed("signaling", header.encode())
            for chunk in chunks:
                self.node.feed("signaling", chunk)
        elif isinstance(item, Update):
            self.pending = item
        elif isinstance(item, tuple):
            u = self.pending
            self.updates.append((u, item[1]))
            self.node.feed("signaling", self.verdict(u).encode())
            self.after_round(u.round)
        elif isinstance(item, Bye):
            self.byes.append(item)

    def reported(self, event: str, fields: dict) -> None:
        """What the node told its user; a subclass may act on it."""

    def after_round(self, r: int) -> None:
        self.node.feed("signaling", RoundClosed(r + 1, 1.0, 1, 0).encode())
        if r + 1 < self.rounds:
            self.open_round(r + 1)
        else:
            self.node.feed("signaling", Bye("job finished").encode())


class ScriptedLinks:
    """Links into a ScriptedCoordinator in place of the WebSocket and data channel."""

    def __init__(self, coordinator: ScriptedCoordinator):
        self.coordinator = coordinator
        self.events: list[tuple[str, dict]] = []

    async def connect(self, node: Node) -> None:
        self.coordinator.attach(node)

    async def send_signal(self, text: str) -> None:
        self.coordinator.hear(text)

    async def send(self, frame) -> None:
        self.coordinator.hear(frame)

    async def use_fallback(self) -> None:
        pass

    async def verify(self, public_key: str, data: bytes, signature: str) -> bool:
        return True

    async def close(self) -> None:
        pass

    def report(self, event: str, **fields) -> None:
        self.events.append((event, fields))
        super().report(event, **fields)
        self.coordinator.reported(event, fields)


class ScriptedTorchPort(ScriptedLinks, TorchPort):
    def __init__(self, coordinator: ScriptedCoordinator):
        ScriptedLinks.__init__(self, coordinator)
        TorchPort.__init__(self, "ws://unused", NodeKey(), torch.device("cpu"), "http://unused", Progress(False))

    async def fetch_shard(self, index: int) -> torch.Tensor:
        return byte_tensor(bytes(range(256)) * 80)  # any shard will do here


def run_node(coordinator: ScriptedCoordinator) -> tuple[Ended, ScriptedTorchPort, Node]:
    port = ScriptedTorchPort(coordinator)
    node = Node(port, port.key.node_id, transport="websocket")
    ended = asyncio.run(asyncio.wait_for(node.run(), 120))
    return ended, port, node


def test_a_node_trains_each_round_it_is_given_and_leaves_when_the_job_ends():
    coordinator = ScriptedCoordinator({0: initial_model(), 1: initial_model() * 0.5})
    ended, port, node = run_node(coordinator)
    assert ended == Ended("finished", "job finished") and node.phase == Phase.LEFT
    assert [u.round for u, _ in coordinator.updates] == [0, 1]
    for (u, payload), r in zip(coordinator.updates, (0, 1)):
        assert u.model_hash == coordinator.hashes[r] and u.node_id == node.node_id and u.inner_steps == 2
        assert len(payload) == 4 * N_PARAMS and np.isfinite(np.frombuffer(payload, "<f4")).all()
    assert node.accepted == 2 and EXIT_CODES[ended.how] == 0


class DeadlineCoordinator(ScriptedCoordinator):
    """Closes a round the node skipped, as the real one does when the deadline passes, and opens the next."""

    def reported(self, event: str, fields: dict) -> None:
        if event == "notice" and "not finite" in fields["message"]:
            self.after_round(0)


def test_a_non_finite_update_is_reported_and_not_sent_and_the_node_carries_on():
    """The torch trainer used to die here: the codec's CodecError went uncaught out of Trainer.run."""
    poisoned = initial_model()
    poisoned[::7] = np.nan
    coordinator = DeadlineCoordinator({0: poisoned, 1: initial_model()})
    ended, port, node = run_node(coordinator)
    notices = [f["message"] for e, f in port.events if e == "notice"]
    assert ended.how == "finished"
    assert [u.round for u, _ in coordinator.updates] == [1]  # round 0 was never sent, round 1 was
    assert node.skipped == 1 and node.accepted == 1
    assert any("not finite" in m and "round 1" in m for m in notices), notices


@pytest.mark.parametrize("code", ["quarantined", "denied"])
def test_quarantine_ends_the_node_without_reconnecting_and_the_trainer_exits_2(code):
    coordinator = ScriptedCoordinator({0: initial_model()}, verdict=lambda u: Error(code, "reputation below the "
                                                                                   "floor", fatal=True))
    coordinator.after_round = lambda r: None
    ended, port, node = run_node(coordinator)
    assert ended.how == "refused" and f"[{code}]" in ended.reason
    assert EXIT_CODES[ended.how] == 2
    assert not [e for e, f in port.events if e == "state" and f["state"] == "reconnecting"]


def test_a_refused_update_is_reported_and_the_node_carries_on():
    verdicts = iter([UpdateResult(0, False, "norm above the bound", "norm-bound"), UpdateResult(1, True)])
    coordinator = ScriptedCoordinator({0: initial_model(), 1: initial_model()}, verdict=lambda u: next(verdicts))
    ended, port, node = run_node(coordinator)
    assert ended.how == "finished" and node.rejected == 1 and node.accepted == 1
    updates = [f for e, f in port.events if e == "update"]
    assert [(f["accepted"], f["rule"]) for f in updates] == [(False, "norm-bound"), (True, "")]


def test_a_finished_job_at_the_door_ends_the_node():
    coordinator = ScriptedCoordinator({0: initial_model()}, welcome_error=Error("finished", "the job is finished",
                                                                                fatal=True))
    ended, _, node = run_node(coordinator)
    assert ended == Ended("finished", "the job is finished") and not coordinator.updates


# -- reconnect with backoff (sessions scripted to end as told; the delays are what Node.run decides) ----------


def run_script(script: list[tuple[bool, Exception]], monkeypatch) -> tuple[Ended, list[float]]:
    node = Node(NodePort(), "ab" * 32)
    sessions = iter(script)
    delays: list[float] = []

    async def session() -> None:
        welcomed, ending = next(sessions)
        node._welcomed = welcomed
        raise ending

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(node, "_session", session)
    monkeypatch.setattr(node, "_sleep_unless_stopped", sleep)
    return asyncio.run(node.run()), delays


def test_the_backoff_starts_afresh_after_a_good_connection(monkeypatch):
    outage = Disconnected("coordinator gone")
    script = [(False, outage)] * 6 + [(True, outage), (False, outage), (False, JobFinished("done"))]
    ended, delays = run_script(script, monkeypatch)
    assert ended == Ended("finished", "done")
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, RECONNECT_MAX_S]
    assert delays[6:] == [RECONNECT_MIN_S, 2 * RECONNECT_MIN_S]  # after the good connection: from the start


def test_a_passing_refusal_is_retried_and_a_permanent_one_ends_the_node(monkeypatch):
    busy = Disconnected("the coordinator cannot take this node now: [busy] ...")
    ended, delays = run_script([(False, busy), (False, OSError("refused")), (False, Refused("[denied] deny list"))],
                               monkeypatch)
    assert ended.how == "refused" and delays == [0.5, 1.0]


def test_frames_the_node_cannot_read_end_the_session_not_the_node():
    node = Node(NodePort(), "ab" * 32)
    node.feed("signaling", "{not json")
    node.feed("signaling", b"\x00binary before the welcome")
    items = [node._inbox.get_nowait() for _ in range(2)]
    assert all(isinstance(i, Disconnected) for i in items)
    assert decode_message(Bye("x").encode()) == Bye("x")


class AheadCoordinator(ScriptedCoordinator):
    """Overlapped rounds: round 1 is assigned while the node trains round 0 (as when round 0 opened ahead of it),
    and the models are published as blobs, as the coordinator's BlobStore serves them."""

    def __init__(self, models: dict[int, np.ndarray]):
        super().__init__(models)
        self.blobs = BlobStore(NodeKey())
        for r in sorted(self.models):
            self.blobs.publish(r, self.models[r])

    def open_round(self, r: int) -> None:
        h = self.hashes[r]
        self.node.feed("signaling", RoundOpen(r, h, "0" * 128, {**CONFIG, "overlap": True}, 0, 0.0,
                                              self.blobs.manifest_of(h)).encode())

    def after_round(self, r: int) -> None:
        if r + 1 == self.rounds:
            self.node.feed("signaling", Bye("job finished").encode())


class AheadPort(ScriptedTorchPort):
    async def fetch_blob(self, name: str) -> bytes | None:
        return self.coordinator.blobs.get(name)

    async def before_training(self, node: Node, work) -> None:
        if work.round == 0:
            self.coordinator.open_round(1)  # heard while round 0 is about to train

    async def train(self, node: Node, work) -> list[float]:
        losses = await super().train(node, work)
        if work.round == 0:  # still in round 0's training: round 1's model arrives meanwhile (however long it takes)
            while not any(e == "model" and f["round"] == 2 for e, f in self.events):
                await asyncio.sleep(0.05)
            self.fetched_while_training = node.phase == Phase.TRAINING and node.model_hash == self.coordinator.hashes[1]
        return losses


def test_with_overlapped_rounds_the_trainer_fetches_the_next_model_while_it_trains():
    coordinator = AheadCoordinator({0: initial_model(), 1: initial_model() * 0.5})
    port = AheadPort(coordinator)
    node = Node(port, port.key.node_id, transport="websocket")
    ended = asyncio.run(asyncio.wait_for(node.run(), 120))
    assert ended.how == "finished" and port.fetched_while_training
    models = [(f["round"], f["source"], f["hash"]) for e, f in port.events if e == "model"]
    assert models == [(1, "blobs", coordinator.hashes[0]), (2, "blobs", coordinator.hashes[1])]  # once each
    assert [(u.round, u.model_hash) for u, _ in coordinator.updates] == [(0, coordinator.hashes[0]),
                                                                         (1, coordinator.hashes[1])]
    assert node.accepted == 2
