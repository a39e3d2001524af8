"""browser/browser_node.py in plain CPython: the page's port (BrowserPort) with a Python bridge and a fake WGSL
trainer. Error feedback under lossy codecs, non-finite pseudo-gradients, and the reports browser/node.js reads,
from a whole session against a scripted coordinator."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from array import array
from types import SimpleNamespace

import pytest

from browser import browser_node
from browser.browser_node import BrowserNode, BrowserPort, batches_at, sample_batches
from server.coordinator.blobs import BlobStore
from server.keys import NodeKey, SignatureError
from server.keys import verify as verify_signature
from shared import compress
from shared.batches import batch_starts
from shared.model import GPTConfig, num_parameters
from shared.node import Node, Work
from shared.rewards import Ledger, RewardTerms
from shared.wire import (Bye, Challenge, Error, FrameReceiver, Have, Hello, Missing, ModelRequest, PathSelect, Receipt,
                         RoundClosed, RoundOpen, Sdp, RoundStats, Update, UpdateResult, Want, Welcome, decode_message,
                         payload_frames)

NODE = "ab" * 32
COORDINATOR = "cd" * 32
SIGNATURE = "ef" * 64  # what the fake WebCrypto signs with; the fake coordinator signs with it too
CFG = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=8)
N = num_parameters(CFG)
JOB = {"model": "test", "params": N, "config": CFG.to_dict()}
SHARD = bytes(range(256)) * 4
STEPS, BATCH, SEQ = 3, 2, 8


class FakeTrainer:
    """kernels.trainer.DeviceTrainer's surface; its pseudo-gradients are the ones the test queues."""

    gradients: list[list[float]] = []
    on_step = None  # called before each group of steps

    def __init__(self, device, cfg, params, max_batch_size=8):
        self.cfg, self.max_batch_size = cfg, max_batch_size
        self.loaded, self.resets, self.batches = [], 0, []

    def load_params(self, params):
        self.loaded.append(bytes(params))

    def reset_optimizer(self):
        self.resets += 1

    async def train_steps(self, batches, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, seq_len=None):
        if FakeTrainer.on_step is not None:
            FakeTrainer.on_step()
        start = len(self.batches)
        self.batches += list(batches)
        return [3.0 - 0.1 * i for i in range(start, len(self.batches))]

    async def pseudo_gradient_fp32(self):
        return array("f", FakeTrainer.gradients.pop(0)).tobytes()


@pytest.fixture(autouse=True)
def fake_gpu(monkeypatch):
    monkeypatch.setattr(browser_node, "DeviceTrainer", FakeTrainer)
    monkeypatch.setattr(browser_node, "BrowserDevice", lambda adapter, device: SimpleNamespace(name="fake"))
    FakeTrainer.gradients, FakeTrainer.on_step = [], None


def spec(text: str) -> compress.CodecSpec:
    return compress.parse_codec(text)


def work(codec: str, round_: int = 0) -> Work:
    schedule = batch_starts(len(SHARD), STEPS, BATCH, SEQ, 7)
    return Work(round_, STEPS, BATCH, SEQ, 1e-3, 0.0, schedule, SHARD, bytes(4 * N), spec(codec))


async def encode_rounds(port: BrowserPort, codecs: list[str], gradients: list[list[float]]) -> list[bytes]:
    """One round per codec, as the Node runs it: train, then encode."""
    FakeTrainer.gradients = [list(g) for g in gradients]
    node = Node(port, "ab" * 32)  # the real node's between-steps hook, before its session (nothing to tell)
    payloads = []
    for i, codec in enumerate(codecs):
        await port.train(node, work(codec, i))
        payloads.append(await port.encode(node, work(codec, i)))
    return payloads


def new_port(bridge=None) -> BrowserPort:
    port = BrowserPort(bridge or SimpleNamespace(report=lambda text: None), device=None)
    port.prepare(JOB, CFG)
    return port


def decoded(codec: str, payload: bytes, n: int = 8) -> list[float]:
    return list(compress.decode(spec(codec), payload, n))


# -- error feedback -------------------------------------------------------------------------------------------

ROUND1 = [8.0, -7.0, 3.0, -2.0, 0.5, 0.25, 0.125, 0.0625]
ROUND2 = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
TOPK = "topk:k=2"


def test_topk_keeps_what_it_dropped_and_sends_it_next_round():
    port = new_port()
    first, second = asyncio.run(encode_rounds(port, [TOPK, TOPK], [ROUND1, ROUND2]))

    assert decoded(TOPK, first) == [8.0, -7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    dropped = [a - b for a, b in zip(ROUND1, decoded(TOPK, first))]
    corrected = [a + b for a, b in zip(ROUND2, dropped)]  # [1, 1, 3, -2, 0.5, ...]
    # round 2 sends the top 2 of its own values plus what round 1 dropped: 3 and -2, not its own 1 and 1
    assert decoded(TOPK, second) == [0.0, 0.0, 3.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert decoded(TOPK, second) == [x if i in (2, 3) else 0.0 for i, x in enumerate(corrected)]
    # nothing is lost: what was sent plus what is still held is everything the two rounds computed
    held = list(port.feedback.residual)
    assert [a + b + c for a, b, c in zip(decoded(TOPK, first), decoded(TOPK, second), held)] == \
        [a + b for a, b in zip(ROUND1, ROUND2)]


def test_fp32_is_lossless_and_keeps_no_residual():
    port = new_port()
    payloads = asyncio.run(encode_rounds(port, ["fp32", "fp32"], [ROUND1, ROUND2]))
    assert [decoded("fp32", p) for p in payloads] == [ROUND1, ROUND2]
    assert port.feedback is None


def test_fp32_after_a_lossy_codec_sends_the_residual_in_full_and_drops_it():
    port = new_port()
    first, second = asyncio.run(encode_rounds(port, [TOPK, "fp32"], [ROUND1, ROUND2]))
    dropped = [a - b for a, b in zip(ROUND1, decoded(TOPK, first))]
    assert decoded("fp32", second) == [a + b for a, b in zip(ROUND2, dropped)]
    assert port.feedback is None


def test_a_new_model_starts_without_a_residual():
    port = new_port()
    asyncio.run(encode_rounds(port, [TOPK], [ROUND1]))
    assert port.feedback is not None
    port.prepare(JOB, CFG)  # a reconnect to the same job keeps it
    assert port.feedback is not None
    other = GPTConfig(n_layer=2, n_head=1, n_embd=4, block_size=8)
    port.prepare({**JOB, "params": num_parameters(other), "config": other.to_dict()}, other)
    assert port.feedback is None and port.trainer is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_pseudo_gradient_raises_codec_error_and_leaves_the_residual(bad):
    port = new_port()
    asyncio.run(encode_rounds(port, [TOPK], [ROUND1]))
    before = array("f", port.feedback.residual)
    with pytest.raises(compress.CodecError):
        asyncio.run(encode_rounds(port, [TOPK], [[bad] + ROUND2[1:]]))
    assert port.feedback.residual == before
    # the next finite round still carries round 1's residual
    (payload,) = asyncio.run(encode_rounds(port, [TOPK], [ROUND2]))
    assert decoded(TOPK, payload) == [0.0, 0.0, 3.0, -2.0, 0.0, 0.0, 0.0, 0.0]

    with pytest.raises(compress.CodecError):
        asyncio.run(encode_rounds(new_port(), ["fp32"], [[bad] + ROUND2[1:]]))


# -- training -------------------------------------------------------------------------------------------------


def test_train_runs_the_schedule_from_the_round_model_and_fresh_adamw():
    reports = []
    port = new_port(SimpleNamespace(report=lambda text: reports.append(json.loads(text))))
    FakeTrainer.gradients = [ROUND1]
    w = dataclasses.replace(work("fp32"), model=b"\x01" * (4 * N))
    losses = asyncio.run(port.train(Node(port, "ab" * 32), w))
    assert losses == pytest.approx([3.0, 2.9, 2.8])
    assert port.trainer.loaded == [w.model] and port.trainer.resets == 1
    assert port.trainer.batches == batches_at(SHARD, w.schedule, SEQ)
    steps = [r for r in reports if r["event"] == "steps"]
    assert steps[-1]["done"] == steps[-1]["total"] == STEPS
    assert sum(len(r["losses"]) for r in steps) == STEPS and all(r["tokens_per_s"] > 0 for r in steps)


def test_batches_are_the_windows_at_the_schedule():
    schedule = batch_starts(len(SHARD), 3, 2, 8, 42)
    for (tokens, targets), rows in zip(batches_at(SHARD, schedule, 8), schedule):
        assert tokens == b"".join(SHARD[s : s + 8] for s in rows)
        assert targets == b"".join(SHARD[s + 1 : s + 9] for s in rows)
    assert sample_batches(SHARD, 3, 2, 8, 42) == batches_at(SHARD, schedule, 8)


# -- a whole session, as node.js drives it --------------------------------------------------------------------


class FakeBridge:
    """browser/node.js's Bridge, with a scripted coordinator behind its sockets: one round, then goodbye."""

    def __init__(self, codec: str = TOPK, webrtc: bool = True):
        self.codec, self.webrtc = codec, webrtc
        self.node: BrowserNode | None = None
        self.reports: list[dict] = []
        self.received: list = []  # what the coordinator received on the round path
        self.signals: list = []  # what it received on the signaling socket
        self.paths: list[str] = []
        self.closed = 0
        self.model = array("f", [0.5] * N).tobytes()
        self.receiver = FrameReceiver(1 << 20)
        self.ledger = Ledger()
        self.peers: list[str] = []  # the tracker's advice in the round's assignment: nodes to dial
        self.seed_slot, self.seed_slots = 0, 1

    def deliver(self, message) -> None:
        source = "webrtc" if self.paths[-1:] == ["webrtc"] else "websocket"
        self.node.on_frame(source, message if isinstance(message, bytes) else message.encode())

    # signaling
    async def connectSignaling(self):
        self.deliver(Challenge("00" * 32, COORDINATOR))

    async def sendSignal(self, text):
        msg = decode_message(text)
        self.signals.append(msg)
        if isinstance(msg, Hello):
            self.deliver(Welcome(msg.node_id, COORDINATOR, JOB, 0))
        elif isinstance(msg, Sdp) and msg.dst == COORDINATOR:
            self.node.on_frame("websocket", Sdp(COORDINATOR, NODE, "answer", "v=0 answer").encode())
        elif isinstance(msg, Sdp):
            self.relay(msg)

    def relay(self, msg: Sdp) -> None:
        """An offer or answer for another node, which the coordinator relays: no other node here."""

    async def createOffer(self):
        return "v=0 offer"

    async def acceptAnswer(self, sdp):
        assert sdp == "v=0 answer"

    async def waitChannelOpen(self, ms):
        return self.webrtc

    def usePath(self, path):
        self.paths.append(path)

    def closeLinks(self):
        self.closed += 1

    # the round path
    async def send(self, data):
        item = self.receiver.feed(data)
        self.received.append(item)
        if isinstance(item, ModelRequest):
            header, chunks = payload_frames(1, "model", self.model)
            self.deliver(header)
            for chunk in chunks:
                self.deliver(chunk)
        elif isinstance(item, tuple) and item[0].kind == "update":
            await self.before_verdict()
            for message in self.after_update():
                self.deliver(message)

    def manifest(self) -> str:
        """The name of the model's manifest in the round's assignment: none here, so the model comes in-band."""
        return ""

    def delta(self) -> str:
        """The name of the manifest of the delta that made the model: none here."""
        return ""

    async def before_verdict(self) -> None:
        """Called when the update has arrived, before the verdict goes out."""

    def after_update(self) -> list:
        """What the coordinator sends once the update arrived: verdict, close, receipt, goodbye."""
        entry = self.ledger.grant(NODE, round=0, terms=RewardTerms())
        return [UpdateResult(0, True), RoundClosed(1, 2.5, 1, 0), Receipt(entry.to_dict(), SIGNATURE),
                Bye("the job has finished")]

    # WebCrypto and fetch
    async def sign(self, data):
        assert isinstance(data, bytes)
        return SIGNATURE

    async def verify(self, node_id, data, signature):
        return node_id == COORDINATOR and signature == SIGNATURE

    async def fetchBytes(self, path):
        assert path == "/api/shards/0"
        return SHARD

    def report(self, text):
        self.reports.append(json.loads(text))
        if self.reports[-1]["event"] == "state" and self.reports[-1]["state"] == "connected":
            model_hash = hashlib.sha256(self.model).hexdigest()
            config = {"inner_steps": STEPS, "batch": BATCH, "seq_len": SEQ, "lr": 1e-3, "weight_decay": 0.0,
                      "codec": spec(self.codec).to_dict(), "deadline_seconds": 60.0}
            self.deliver(RoundOpen(0, model_hash, SIGNATURE, config, 0, time.time() + 60, self.manifest(),
                                   self.delta(), list(self.peers), self.seed_slot, self.seed_slots))
        elif self.reports[-1]["event"] == "notice" and "not finite" in self.reports[-1]["message"]:
            self.deliver(Bye("the job has finished"))

    def events(self, name: str) -> list[dict]:
        return [r for r in self.reports if r["event"] == name]


def session(bridge: FakeBridge, transport: str = "auto", gradients=None) -> str:
    FakeTrainer.gradients = [list(g) for g in (gradients or [[0.25] * N])]
    node = BrowserNode(bridge, NODE, "adapter", "device", "browser: test", transport)
    bridge.node = node
    return asyncio.run(asyncio.wait_for(node.run(), 30))


@pytest.mark.parametrize("transport,path", [("auto", "webrtc"), ("websocket", "websocket")])
def test_a_round_reaches_the_page_as_the_reports_node_js_reads(transport, path):
    bridge = FakeBridge()
    gradient = [0.0] * N
    gradient[5], gradient[9] = 2.0, -3.0
    assert session(bridge, transport, [gradient]) == "finished: the job has finished"

    # the handshake and the path, as the page's node signed them
    hello = next(m for m in bridge.signals if isinstance(m, Hello))
    assert (hello.node_id, hello.kind, hello.signature, hello.agent) == (NODE, "browser", SIGNATURE, "browser: test")
    assert bridge.paths == [path]
    assert any(isinstance(m, PathSelect) for m in bridge.signals) == (path == "websocket")
    # the signed update, and a payload that decodes to what the trainer computed
    update = next(m for m in bridge.received if isinstance(m, Update))
    assert (update.round, update.signature, update.inner_steps, update.num_values) == (0, SIGNATURE, STEPS, N)
    assert update.model_hash == hashlib.sha256(bridge.model).hexdigest()
    (header, payload), = [m for m in bridge.received if isinstance(m, tuple)]
    assert list(compress.decode(spec(TOPK), payload, N)) == gradient
    assert bridge.closed >= 1

    # every report is JSON with what node.js's onReport reads
    states = bridge.events("state")
    assert [s["state"] for s in states] == ["connecting", "opening data channel", "connected"]
    assert states[0]["path"] is None and states[1]["round"] == 0
    assert states[2]["path"] == path and states[2]["node_id"] == NODE
    (round_,) = bridge.events("round")
    assert (round_["round"], round_["steps"], round_["batch"]) == (1, STEPS, BATCH)
    steps = bridge.events("steps")
    assert steps[-1]["done"] == steps[-1]["total"] == STEPS and all("tokens_per_s" in s for s in steps)
    assert [x for s in steps for x in s["losses"]] == pytest.approx([3.0, 2.9, 2.8])
    (uploaded,) = bridge.events("uploaded")
    assert uploaded["bytes"] == len(payload)
    (update_report,) = bridge.events("update")
    assert update_report["accepted"] is True and (update_report["accepted_total"], update_report["rejected_total"]) == (1, 0)
    assert {"rule", "reason", "steps", "loss_first", "loss_last", "tokens_per_s"} <= set(update_report)
    (closed,) = bridge.events("round_closed")
    assert (closed["round"], closed["val_loss"], closed["accepted"]) == (1, 2.5, 1) and "balance" in closed
    (receipt,) = bridge.events("receipt")
    entry = bridge.ledger.entries[0]
    assert (receipt["seq"], receipt["round"], receipt["kind"], receipt["verified"]) == (entry.seq, 0, "grant", True)
    assert receipt["amount"] + receipt["stake_change"] > 0 and receipt["balance"] == entry.balances[NODE]
    assert bridge.events("finished") == [{"event": "finished", "reason": "the job has finished"}]
    assert not bridge.events("fatal") and not bridge.events("notice")


def test_without_a_data_channel_auto_falls_back_to_the_websocket_and_says_so():
    bridge = FakeBridge(webrtc=False)
    assert session(bridge).startswith("finished")
    assert bridge.paths == ["websocket"]
    assert any("WebSocket fallback" in n["message"] for n in bridge.events("notice"))
    assert bridge.events("state")[-1]["path"] == "websocket"


def test_a_non_finite_update_is_reported_and_not_sent():
    bridge = FakeBridge()
    assert session(bridge, gradients=[[float("nan")] * N]).startswith("finished")
    assert not any(isinstance(m, Update) for m in bridge.received)
    (notice,) = bridge.events("notice")
    assert "not finite" in notice["message"]


def test_stop_during_training_says_goodbye_and_ends_stopped():
    bridge = FakeBridge()
    FakeTrainer.on_step = lambda: bridge.node.stop()
    assert session(bridge) == "stopped"
    assert any(isinstance(m, Bye) and m.reason == "stopped" for m in bridge.received)
    assert not any(isinstance(m, Update) for m in bridge.received)
    assert not bridge.events("finished")


class QuarantiningBridge(FakeBridge):
    """The coordinator removes the node when its update arrives, as it does a node below the reputation floor."""

    def after_update(self) -> list:
        return [Error("quarantined", "reputation below the floor", fatal=True)]


def test_quarantine_ends_the_browser_node_as_it_ends_the_trainer():
    """The same ending as tests/test_node.py's trainer (exit code 2 there): refused, no reconnect. The browser
    used to read quarantine as a lost link and reconnect."""
    bridge = QuarantiningBridge()
    outcome = session(bridge)
    assert outcome == "refused: the coordinator refused this node: [quarantined] reputation below the floor"
    assert bridge.events("fatal") and not [r for r in bridge.events("state") if r["state"] == "reconnecting"]
    assert sum(isinstance(m, Hello) for m in bridge.signals) == 1


class BlobBridge(FakeBridge):
    """A coordinator that serves the model as blobs (server/coordinator/blobs.py) at /api/blobs, and signs its
    manifest with a real key: the page fetches the chunks with fetch() and never asks over the link."""

    def __init__(self, tamper: bool = False):
        super().__init__()
        self.key = NodeKey()
        self.blobs = BlobStore(self.key)
        self.published = self.blobs.publish(0, self.model)
        self.tamper = tamper

    def manifest(self) -> str:
        return self.published.sha256

    async def verify(self, node_id, data, signature):
        if signature == SIGNATURE:
            return await super().verify(node_id, data, signature)
        try:
            verify_signature(self.key.node_id, bytes(data), signature)
            return True
        except SignatureError:
            return False

    async def fetchBytes(self, path):
        if not path.startswith("/api/blobs/"):
            return await super().fetchBytes(path)
        data = self.blobs.get(path.rsplit("/", 1)[1])
        if data is None:
            raise RuntimeError(f"GET {path} failed: HTTP 404")
        return data[:-1] + bytes([data[-1] ^ 1]) if self.tamper and path.endswith(self.published.chunks[-1]) else data


def test_the_page_fetches_the_model_as_checked_blobs_and_not_over_the_link():
    bridge = BlobBridge()
    assert session(bridge).startswith("finished")
    assert not any(isinstance(m, ModelRequest) for m in bridge.received)
    (model,) = bridge.events("model")
    assert (model["source"], model["bytes"], model["chunks"]) == ("blobs", len(bridge.model), 1)
    assert any(isinstance(m, tuple) and m[0].kind == "update" for m in bridge.received)


def test_a_chunk_that_does_not_match_its_name_is_dropped_and_the_model_comes_over_the_link():
    bridge = BlobBridge(tamper=True)
    assert session(bridge).startswith("finished")
    assert any(isinstance(m, ModelRequest) for m in bridge.received)
    (notice,) = bridge.events("notice")
    assert "does not match its hash" in notice["message"]
    assert [m["source"] for m in bridge.events("model")] == ["link"]


class DeltaBridge(BlobBridge):
    """A coordinator whose current model was made by an int8 delta from `base`: a node holding `base` fetches only
    the delta; a node further behind (or holding nothing) fetches the snapshot."""

    def __init__(self):
        super().__init__()
        spec = compress.parse_codec("int8")
        self.base = array("f", [0.5] * N).tobytes()
        change = [0.01 * ((i % 7) - 3) for i in range(N)]
        self.payload = compress.encode(spec, change)
        self.model = compress.apply_delta(self.base, spec, self.payload)  # what the coordinator holds
        self.blobs = BlobStore(self.key)
        self.published = self.blobs.publish(1, self.model, (hashlib.sha256(self.base).hexdigest(), "int8",
                                                            self.payload))

    def delta(self) -> str:
        return self.blobs.delta_of(self.published.result_hash)


def session_holding(bridge: FakeBridge, held: bytes) -> str:
    FakeTrainer.gradients = [[0.25] * N]
    node = BrowserNode(bridge, NODE, "adapter", "device", "browser: test", "auto")
    node.node.cfg, node.node.model, node.node.model_hash = CFG, held, hashlib.sha256(held).hexdigest()
    bridge.node = node
    return asyncio.run(asyncio.wait_for(node.run(), 30))


def test_a_current_page_applies_only_the_delta_and_one_further_behind_catches_up_from_the_snapshot():
    current = DeltaBridge()
    assert session_holding(current, current.base).startswith("finished")
    (model,) = current.events("model")
    assert (model["source"], model["bytes"]) == ("delta", len(current.payload))
    assert len(current.payload) < len(current.model) / 3.5

    behind = DeltaBridge()
    older = array("f", [0.25] * N).tobytes()  # two rounds behind: the delta's base is not what it holds
    assert session_holding(behind, older).startswith("finished")
    (model,) = behind.events("model")
    assert (model["source"], model["bytes"]) == ("blobs", len(behind.model))
    assert not behind.events("notice") and not any(isinstance(m, ModelRequest) for m in behind.received)


# -- peer links, as browser/peers.js carries them ------------------------------------------------------------

PEER = "12" * 32


class PeerBridge(BlobBridge):
    """BlobBridge plus another node, PEER, which the round's assignment names as a peer to dial, behind node.js's
    peer hooks (peerOffer, peerAnswer, peerAccept, peerSend, peerClose): the page's offer is relayed to PEER, PEER
    answers, the link opens, and PEER trades blobs over it with shared.wire's messages. PEER serves what it holds
    (`peer_holds`: name -> bytes; `corrupt` names one it serves with a flipped byte under its true header) and asks
    for every blob the page announces that it does not hold, checking what comes against its name."""

    def __init__(self, seed_slot: int, seed_slots: int):
        super().__init__()
        self.peers, self.seed_slot, self.seed_slots = [PEER], seed_slot, seed_slots
        self.peer_holds: dict[str, bytes] = {}
        self.corrupt = ""
        self.calls: list[tuple] = []  # the peer hooks the page's node called, in order
        self.peer_receiver = FrameReceiver(1 << 20)
        self.peer_got: dict[str, bytes] = {}  # blobs PEER received from the page, checked against their names
        self.fetched: list[str] = []  # what the page fetched from the coordinator's /api/blobs

    def model_blobs(self) -> dict[str, bytes]:
        return {name: self.blobs.get(name) for name in [self.published.sha256, *self.published.chunks]}

    def relay(self, msg: Sdp) -> None:
        assert (msg.src, msg.dst, msg.sdp_type, msg.sdp) == (NODE, PEER, "offer", f"v=0 offer to {PEER}")
        self.node.on_frame("websocket", Sdp(PEER, NODE, "answer", "v=0 answer from the peer").encode())

    async def peerOffer(self, peer):
        self.calls.append(("offer", peer))
        return f"v=0 offer to {peer}"

    async def peerAnswer(self, peer, offer):
        raise AssertionError("PEER never dials: the page does, as the tracker advised")

    async def peerAccept(self, peer, answer):
        self.calls.append(("accept", peer, answer))
        asyncio.get_running_loop().call_soon(self.link_opened)  # as the channel's open event comes later

    def link_opened(self) -> None:
        self.node.on_peer_open(PEER)
        if self.peer_holds:
            self.from_peer(Have(list(self.peer_holds)).encode())

    def from_peer(self, frame) -> None:
        self.node.on_peer_frame(PEER, frame)

    async def peerSend(self, peer, data):
        assert peer == PEER and ("close", PEER) not in self.calls
        item = self.peer_receiver.feed(data)
        if isinstance(item, Want):
            data = self.peer_holds.get(item.name)
            if data is None:
                self.from_peer(Missing(item.name).encode())
                return
            header, chunks = payload_frames(0, "blob", data)
            self.from_peer(header.encode())
            for chunk in chunks:
                self.from_peer(chunk[:-1] + bytes([chunk[-1] ^ 1]) if item.name == self.corrupt else chunk)
        elif isinstance(item, Have):
            for name in item.names:
                if name not in self.peer_holds and name not in self.peer_got:
                    self.from_peer(Want(name).encode())
        elif isinstance(item, tuple):
            header, data = item  # the receiver checked data against header.sha256
            self.peer_got[header.sha256] = data

    def peerClose(self, peer):
        self.calls.append(("close", peer))

    async def fetchBytes(self, path):
        self.fetched.append(path)
        return await super().fetchBytes(path)


def peer_session(bridge: PeerBridge) -> str:
    """A session whose node waits as long as it takes for a peer to offer what is not in its seed share, so that
    nothing here depends on speed: what comes from the coordinator is what the seed share or a failed peer sends
    there."""
    FakeTrainer.gradients = [[0.25] * N]
    node = BrowserNode(bridge, NODE, "adapter", "device", "browser: test", "auto")
    node.node.swarm.wait_s = 3600.0
    bridge.node = node
    return asyncio.run(asyncio.wait_for(node.run(), 30))


def test_the_page_dials_its_advised_peer_and_fetches_the_model_from_it():
    bridge = PeerBridge(seed_slot=1, seed_slots=2)  # neither the manifest nor the one chunk is the page's to seed
    bridge.peer_holds = bridge.model_blobs()
    assert peer_session(bridge).startswith("finished")

    assert bridge.calls[:2] == [("offer", PEER), ("accept", PEER, "v=0 answer from the peer")]
    assert not [path for path in bridge.fetched if path.startswith("/api/blobs/")]
    manifest = bridge.blobs.get(bridge.published.sha256)
    (model,) = bridge.events("model")
    assert (model["source"], model["hash"]) == ("blobs", hashlib.sha256(bridge.model).hexdigest())
    assert (model["from_peers"], model["from_coordinator"]) == (len(manifest) + len(bridge.model), 0)
    # the bytes that came over the peer link are the model the page trained on and the update says it trained on
    assert bridge.node.port.trainer.loaded == [bridge.model]
    update = next(m for m in bridge.received if isinstance(m, Update))
    assert update.model_hash == hashlib.sha256(bridge.model).hexdigest()
    (traffic,) = [m for m in bridge.received if isinstance(m, RoundStats)]
    assert (traffic.peers, traffic.bytes_from_peers, traffic.bytes_from_coordinator) == (1, model["from_peers"], 0)
    # the page heard of the link opening, and of it closing when the node left
    assert [r["open"] for r in bridge.events("peers")] == [1, 0]
    assert bridge.calls[-1] == ("close", PEER)


def test_a_peer_whose_blob_does_not_match_its_hash_is_banned_and_the_chunk_comes_from_the_coordinator():
    bridge = PeerBridge(seed_slot=1, seed_slots=2)
    bridge.peer_holds = bridge.model_blobs()
    (chunk,) = bridge.published.chunks
    bridge.corrupt = chunk
    assert peer_session(bridge).startswith("finished")

    (notice,) = bridge.events("notice")
    assert "does not match its hash" in notice["message"] and PEER[:12] in notice["message"]
    assert ("close", PEER) in bridge.calls
    assert bridge.node.node.swarm.banned == {PEER}
    assert [p for p in bridge.fetched if p.startswith("/api/blobs/")] == [f"/api/blobs/{chunk}"]
    (model,) = bridge.events("model")
    manifest = bridge.blobs.get(bridge.published.sha256)
    assert (model["from_peers"], model["from_coordinator"]) == (len(manifest), len(bridge.model))
    assert bridge.node.port.trainer.loaded == [bridge.model]  # the true bytes, not the peer's
    assert [r["open"] for r in bridge.events("peers")] == [1, 0]


class ServedPeerBridge(PeerBridge):
    """PEER holds nothing; the coordinator gives its verdict only once PEER has the model's blobs from the page."""

    def __init__(self):
        super().__init__(seed_slot=0, seed_slots=1)  # the page seeds every chunk: from the coordinator at once
        self.peer_has_all = asyncio.Event()

    async def peerSend(self, peer, data):
        await super().peerSend(peer, data)
        if set(self.peer_got) >= set(self.model_blobs()):
            self.peer_has_all.set()

    async def before_verdict(self) -> None:
        await self.peer_has_all.wait()


def test_the_page_serves_the_blobs_it_holds_to_its_peer():
    bridge = ServedPeerBridge()
    assert peer_session(bridge).startswith("finished")
    assert bridge.peer_got == bridge.model_blobs()
    (chunk,) = bridge.published.chunks
    assert bridge.peer_got[chunk] == bridge.model
    assert bridge.node.node.swarm.bytes_to_peers == sum(len(b) for b in bridge.model_blobs().values())
    (model,) = bridge.events("model")
    assert (model["from_peers"], model["from_coordinator"]) == (0, sum(len(b) for b in bridge.model_blobs().values()))
