"""The "Try the model" worker's Python, run by its own Pyodide in a Web Worker (browser/generate.js): fetches the
coordinator's current model, checked against its signed manifest, and streams generated tokens to the page.

Never touch a training node: this runtime has its own GPUDevice, so its queue is not the trainer's and generation
never delays a training step's submissions. Never decide protocol steps here; this only reads public blobs.
"""

from __future__ import annotations

import asyncio
import json
from array import array
from typing import Any

from kernels.device import Device, DeviceError
from kernels.generate import DeviceGenerator, GenerationError
from shared.manifest import Manifest, ManifestError, assemble
from shared.model import GPTConfig, num_parameters

try:
    from pyodide.ffi import JsException, to_js
except ImportError:  # plain CPython: a Python bridge takes Python values
    JsException = OSError  # type: ignore[misc,assignment]

    def to_js(value: Any) -> Any:
        return value

# A round may commit between reading /api/status and fetching its blobs, and the old model's blobs then go: read
# the status again this many times before giving up.
MODEL_FETCH_ATTEMPTS = 3


def _bytes(value: Any) -> bytes:
    """An ArrayBuffer or typed array from JS (a JsProxy), or Python bytes, as bytes."""
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else value.to_bytes()


def _ids(value: Any) -> list[int]:
    """Token ids from JS (an Array or typed array of numbers), or from Python (bytes or a list), as a list."""
    return value.to_py() if hasattr(value, "to_py") else list(value)


class ModelUnavailable(RuntimeError):
    """The coordinator has no model to share yet, or what it served does not check out."""


class GenerationSession:
    """One worker's generator: the current model (fetched again only when the coordinator's model hash moves) and
    the generation in progress. `bridge` is JS: fetchBytes(path), verify(nodeIdHex, data, signatureHex),
    token(id) and progress(text)."""

    def __init__(self, bridge: Any, device: Device):
        self.bridge = bridge
        self.device = device
        self.generator: DeviceGenerator | None = None
        self.model_hash = ""
        self.round: int | None = None
        self.stopping = False

    @classmethod
    async def create(cls, bridge: Any) -> "GenerationSession":
        from kernels.device_browser import BrowserDevice

        return cls(bridge, await BrowserDevice.create())

    def stop(self) -> None:
        """End the generation in progress after its current token."""
        self.stopping = True

    async def generate(self, prompt: Any, max_new_tokens: int, temperature: float) -> str:
        """Stream up to `max_new_tokens` tokens after `prompt` (token ids, which JS encodes with the job's
        tokenizer) through bridge.token; returns JSON
        {tokens, stopped, round, model_hash}, or {error} for a request or a model that cannot be served."""
        self.stopping = False
        try:
            generator = await self._current_model()
            produced = 0
            async for token in generator.generate(_ids(prompt), int(max_new_tokens), float(temperature)):
                self.bridge.token(token)
                produced += 1
                await asyncio.sleep(0)  # lets the worker take a stop message between tokens
                if self.stopping:
                    break
        except (GenerationError, ManifestError, ModelUnavailable, DeviceError) as e:
            return json.dumps({"error": str(e)})
        return json.dumps({"tokens": produced, "stopped": self.stopping, "round": self.round,
                           "model_hash": self.model_hash})

    async def _current_model(self) -> DeviceGenerator:
        for _ in range(MODEL_FETCH_ATTEMPTS - 1):
            try:
                return await self._load_current_model()
            except JsException as e:  # a failed fetch (bridge.fetchBytes throws on HTTP errors)
                self.bridge.progress(f"fetching the model failed ({e}); trying again…")
        return await self._load_current_model()

    async def _load_current_model(self) -> DeviceGenerator:
        status = json.loads(_bytes(await self.bridge.fetchBytes("/api/status")))
        if self.generator is not None and status["model_hash"] == self.model_hash:
            return self.generator
        if not status.get("manifest"):
            raise ModelUnavailable("the coordinator has no model snapshot to share yet: try again after a round")
        self.bridge.progress(f"fetching the model of round {status['round']}…")
        cfg = GPTConfig.from_dict(status["job"]["config"])
        params = await self._fetch_snapshot(status["manifest"], status["model_hash"], status["coordinator_id"])
        if len(params) != num_parameters(cfg):
            raise ModelUnavailable(f"the snapshot holds {len(params)} parameters, the job's model has "
                                   f"{num_parameters(cfg)}")
        if self.generator is not None and self.generator.cfg == cfg:
            self.generator.load_params(params)
        else:
            self.generator = DeviceGenerator(self.device, cfg, params)
        self.model_hash, self.round = status["model_hash"], status["round"]
        return self.generator

    async def _fetch_snapshot(self, manifest_name: str, model_hash: str, coordinator_id: str) -> array:
        """The model's float32 parameters from /api/blobs: the manifest checked against its name and the
        coordinator's signature, every chunk against its hash, and the whole against the model hash."""
        manifest = Manifest.from_bytes(_bytes(await self.bridge.fetchBytes(f"/api/blobs/{manifest_name}")),
                                       manifest_name)
        if (manifest.kind, manifest.result_hash) != ("snapshot", model_hash):
            raise ModelUnavailable("the manifest the coordinator names is not its current model's snapshot")
        if not await self.bridge.verify(coordinator_id, to_js(manifest.signing_bytes()), manifest.signature):
            raise ModelUnavailable("the model's manifest is not signed by the coordinator")
        chunks = await asyncio.gather(*(self.bridge.fetchBytes(f"/api/blobs/{name}") for name in manifest.chunks))
        data = assemble(manifest, [_bytes(chunk) for chunk in chunks])
        if len(data) % 4:
            raise ModelUnavailable(f"a snapshot of {len(data)} bytes is not float32 parameters")
        return array("f", data)
