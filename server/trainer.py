"""The PyTorch trainer node: shared/node.py's protocol with torch (CUDA when present) doing the work.

This driver supplies what differs from other nodes: the model on a torch device, shards over HTTP, H inner AdamW
steps from a fresh optimizer (what the coordinator's spot check re-executes), the pseudo-gradient encoded with
error feedback, and a status line on the terminal. Never put round logic here: it belongs to shared/node.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from server.codecs import TorchErrorFeedback, apply_delta
from server.keys import NodeKey
from server.model import GPT, flat_parameters, load_flat_parameters
from server.net import rtc
from server.net.blob_http import BlobServer, ListenError
from server.net.client import ClientLinks
from server.trainer_metrics import DEFAULT_METRICS_HOST, TrainerMetrics
from server.training import inner_steps, token_tensor
from shared.compress import CodecSpec
from shared.manifest import MAX_BLOB_BYTES
from shared.model import GPTConfig
from shared.node import Disconnected, Node, Refused, Work
from shared.tokens import BYTE_VOCAB

if TYPE_CHECKING:
    from server.distributed import Leader

log = logging.getLogger("swarmgrad.trainer")

EXIT_CODES = {"finished": 0, "stopped": 0, "refused": 2}


@dataclass
class TrainerOptions:
    coordinator: str  # http://host:port
    device: str = "auto"
    max_rounds: int = 0  # 0 = until the job ends
    ice_hosts: list[str] = field(default_factory=list)
    transport: str = "auto"  # auto | webrtc | websocket
    key_file: Path | None = None
    progress: bool = True
    ice_relay_only: bool = False  # TURN relay candidates only
    listen: tuple[str, int] | None = None  # serve held blobs to peers over HTTP here (--listen HOST:PORT)
    name: str = ""  # shown on the leaderboard, signed in the Hello (--name)
    team: str = ""  # the team it counts for there (--team)
    metrics_port: int = 0  # serve this trainer's Prometheus metrics on this port; 0 = not at all (--metrics-port)
    metrics_host: str = DEFAULT_METRICS_HOST  # ... at this address (--metrics-host)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise Refused("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


class Progress:
    """One status line: rewritten in place on a terminal, printed once per round otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif final:
            print(text, file=sys.stderr, flush=True)


class TorchPort(ClientLinks):
    """The trainer's port: aiortc/WebSocket links (ClientLinks), torch for the work."""

    kind = "trainer"

    def __init__(self, ws_url: str, key: NodeKey, device: torch.device, http_base: str, progress: Progress,
                 ranks: Leader | None = None):
        super().__init__(ws_url, key)
        self.device, self.http_base, self.progress = device, http_base, progress
        self.ranks = ranks  # torchrun's ranks hold and train the model instead (server.distributed)
        self.agent = f"torch {torch.__version__} {device}"
        self.model: GPT | None = None
        self.vocab_size = BYTE_VOCAB  # the job's, from prepare: shards are read in its token width
        self.error_feedback: TorchErrorFeedback | None = None  # what lossy codecs left out, sent next round
        self.metrics = TrainerMetrics()

    def prepare(self, job: dict, cfg: GPTConfig) -> None:
        super().prepare(job, cfg)  # the job's ICE servers
        self.vocab_size = cfg.vocab_size
        held = self.ranks.job_cfg if self.ranks is not None else self.model.cfg if self.model is not None else None
        if held != cfg:
            if self.ranks is not None:
                self.ranks.prepare(cfg)
            else:
                self.model = GPT(cfg).to(self.device)
            self.error_feedback = TorchErrorFeedback(int(job["params"]))
            log.info("model %s: %d parameters on %s", job["model"], job["params"], self.device)

    async def fetch_shard(self, index: int) -> torch.Tensor:
        def fetch() -> bytes:
            with urllib.request.urlopen(f"{self.http_base}/api/shards/{index}", timeout=30) as r:
                return r.read()

        try:
            return token_tensor(await asyncio.to_thread(fetch), self.vocab_size)
        except OSError as e:
            raise Disconnected(f"cannot fetch shard {index}: {e}") from e

    async def fetch_blob(self, name: str) -> bytes | None:
        def fetch() -> bytes:
            with urllib.request.urlopen(f"{self.http_base}/api/blobs/{name}", timeout=30) as r:
                data = r.read(MAX_BLOB_BYTES + 1)  # whoever serves it, no blob may cost more memory than this
            if len(data) > MAX_BLOB_BYTES:
                raise OSError(f"more than {MAX_BLOB_BYTES} bytes")
            return data

        try:
            return await asyncio.to_thread(fetch)
        except OSError as e:
            log.info("blob %s… not fetched: %s", name[:12], e)
            return None

    prefetches = True  # new arrays for every model, and training runs in a worker thread

    def load_model(self, model_hash: str, data: bytes) -> np.ndarray:
        return np.frombuffer(data, "<f4").astype(np.float32)

    def applies_delta(self, model: np.ndarray) -> bool:
        return True

    def apply_delta(self, model: np.ndarray, codec: CodecSpec, data: bytes) -> tuple[np.ndarray, bytes]:
        new = apply_delta(model, codec, data)
        return new, new.tobytes()

    async def train(self, node: Node, work: Work) -> list[float]:
        started = time.time()

        def show(step: int, loss: float) -> None:
            rate = (step + 1) * work.batch * work.seq_len / max(time.time() - started, 1e-9)
            self.metrics.inner_step(loss, rate)
            self.progress.show(f"round {work.round + 1} | step {step + 1}/{work.steps} | {rate:,.0f} tok/s | "
                               f"loss {loss:.3f} | {node.accepted} accepted")

        if self.ranks is not None:
            losses = await asyncio.to_thread(self.ranks.train, work, show)
        else:
            load_flat_parameters(self.model, torch.from_numpy(work.model))
            losses = await asyncio.to_thread(inner_steps, self.model, work.shard, work.schedule, work.seq_len,
                                             work.lr, work.weight_decay, show)
        self.metrics.trained(time.time() - started)
        return losses

    async def encode(self, node: Node, work: Work) -> bytes:
        trained = self.ranks.trained() if self.ranks is not None else flat_parameters(self.model)
        pseudo_gradient = work.model - trained.numpy()
        return self.error_feedback.encode(work.spec, torch.from_numpy(pseudo_gradient))

    def report(self, event: str, **f) -> None:
        self.metrics.observe(event, f)
        if event == "state" and f["state"] == "connected":
            self.progress.show(f"joined {self.http_base} as {f['node_id'][:12]}… over {f['path']}", final=True)
        elif event == "state" and f["state"] == "reconnecting":
            log.warning("connection to the coordinator lost: %s", f["message"])
        elif event == "round" and f["plan"]:
            log.info("round %d: %s", f["round"], f["plan"])
        elif event == "model" and f["source"] in ("blobs", "delta"):
            what = "model fetched as" if f["source"] == "blobs" else "model updated by a delta of"
            log.info("round %d: %s %d chunks (%d bytes): %d bytes from peers, %d from the coordinator; model %s; "
                     "%d of the bytes from peers over HTTP", f["round"], what, f["chunks"], f["bytes"], f["from_peers"],
                     f["from_coordinator"], f["hash"], f["from_peers_direct"])
        elif event == "model":
            log.info("round %d: model fetched over the %s (%d bytes); model %s", f["round"], f["source"], f["bytes"],
                     f["hash"])
        elif event == "uploaded":
            log.info("round %d: uploaded %d bytes, sha256 %s, trained on model %s", f["round"] + 1, f["bytes"],
                     f["sha256"], f["model_hash"])
        elif event == "round_closed":
            balance = "" if f["balance"] is None else f" | balance {f['balance'] / 1e6:.6f} credits"
            self.progress.show(f"round {f['round']} closed: validation loss {f['val_loss']:.4f}, "
                               f"{f['accepted']} update(s) accepted{balance}", final=True)
        elif event == "update":
            verdict = "accepted" if f["accepted"] else f"rejected [{f['rule']}] {f['reason']}"
            self.progress.show(f"round {f['round'] + 1}: update {verdict} | loss {f['loss_first']:.3f} -> "
                               f"{f['loss_last']:.3f} | {f['tokens_per_s']:,.0f} tok/s | H={f['steps']} | "
                               f"{f['accepted_total']} accepted", final=True)
        elif event == "notice":
            log.warning("%s", f["message"])
        elif event == "finished":
            self.progress.show(f"leaving: {f['reason']}", final=True)
        elif event == "fatal":
            log.error("%s", f["message"])


class Trainer:
    """`python -m server trainer`: one Node over a TorchPort. `run()` returns the exit code."""

    def __init__(self, options: TrainerOptions, ranks: Leader | None = None):
        parts = urlsplit(options.coordinator)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Refused(f"--coordinator must be an http(s) URL like http://127.0.0.1:8000, got {options.coordinator!r}")
        self.key = NodeKey.load_or_create(options.key_file) if options.key_file else NodeKey()
        ws_url = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, "/ws", "", ""))
        self.port = TorchPort(ws_url, self.key, resolve_device(options.device),
                              urlunsplit((parts.scheme, parts.netloc, "", "", "")), Progress(options.progress),
                              ranks)
        self.port.name, self.port.team = options.name, options.team
        self.node = Node(self.port, self.key.node_id, options.transport, options.max_rounds)
        self.listen = options.listen
        self.metrics_address = (options.metrics_host, options.metrics_port) if options.metrics_port else None
        self.blob_server = BlobServer(self.node.swarm.serve_direct)

    async def run(self) -> int:
        if self.listen is not None:
            try:
                self.port.blob_url = await self.blob_server.start(*self.listen)
            except (OSError, ListenError) as e:
                raise Refused(f"--listen {self.listen[0]}:{self.listen[1]}: {e}") from None
            log.info("serving held blobs to peers at %s/blobs/{sha256}", self.port.blob_url)
        if self.metrics_address is not None:
            try:
                self.port.metrics.serve(*self.metrics_address)
            except OSError as e:
                raise Refused(f"--metrics-port {self.metrics_address[1]}: {e}") from None
        try:
            return EXIT_CODES[(await self.node.run()).how]
        finally:
            await self.blob_server.close()
            self.port.metrics.close()


def configure_ice(options: TrainerOptions) -> None:
    hosts = options.ice_hosts
    if not hosts:
        host = urlsplit(options.coordinator).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1"):
            hosts = ["::1" if host == "::1" else "127.0.0.1"]  # a coordinator on loopback is reached on loopback
    if hosts:
        rtc.restrict_ice_hosts(hosts)
    rtc.require_relay(options.ice_relay_only)
