"""The blobs the coordinator serves at `GET /api/blobs/{sha256}`: each published model's snapshot and the delta that
led to it, as chunks with a signed manifest each (shared/manifest.py), kept for the last few rounds so that a node
a round behind still finds them.

Never serve a blob under a name that is not the sha256 of its bytes: clients and caches trust the name.
"""

from __future__ import annotations

from collections import OrderedDict

from server.keys import NodeKey
from shared.manifest import Manifest, cut, delta_manifest, snapshot_manifest

ROUNDS_SERVED = 2  # the current model's blobs and the previous one's


class BlobStore:
    def __init__(self, key: NodeKey, rounds_served: int = ROUNDS_SERVED):
        self.key = key
        self.rounds_served = rounds_served
        self._by_model: OrderedDict[str, dict[str, bytes | memoryview]] = OrderedDict()  # model hash -> its blobs
        self._manifests: dict[str, str] = {}  # model hash -> its snapshot's manifest's name
        self._deltas: dict[str, str] = {}  # model hash -> the name of the manifest of the delta that made it
        self.bytes_served = 0

    def publish(self, round_: int, data: bytes, delta: tuple[str, str, bytes] | None = None) -> Manifest:
        """Serve a model: its float32 bytes as a snapshot and, when given, `delta` = (base model hash, codec,
        encoded delta), each cut into chunks under a signed manifest. Older models beyond `rounds_served` stop
        being served. Returns the snapshot's signed manifest (its name is `manifest.sha256`)."""
        blobs: dict[str, bytes | memoryview] = {}
        snapshot = self._add(blobs, snapshot_manifest(round_, data, chunks := cut(data)), chunks)
        self._manifests[snapshot.result_hash] = snapshot.sha256
        if delta is not None:
            base, codec, payload = delta
            unsigned = delta_manifest(round_, base, snapshot.result_hash, codec, payload, chunks := cut(payload))
            self._deltas[snapshot.result_hash] = self._add(blobs, unsigned, chunks).sha256
        self._by_model[snapshot.result_hash] = blobs
        self._by_model.move_to_end(snapshot.result_hash)
        while len(self._by_model) > self.rounds_served:
            old, _ = self._by_model.popitem(last=False)
            self._manifests.pop(old, None)
            self._deltas.pop(old, None)
        return snapshot

    def _add(self, blobs: dict, unsigned: Manifest, chunks: list[memoryview]) -> Manifest:
        manifest = Manifest(**{**unsigned.__dict__, "signature": self.key.sign(unsigned.signing_bytes())})
        blobs.update(zip(manifest.chunks, chunks))
        blobs[manifest.sha256] = manifest.to_bytes()
        return manifest

    def manifest_of(self, model_hash: str) -> str:
        """The name of the snapshot manifest of a published model; "" when it is not served."""
        return self._manifests.get(model_hash, "")

    def delta_of(self, model_hash: str) -> str:
        """The name of the manifest of the delta that made a published model; "" when there is none."""
        return self._deltas.get(model_hash, "")

    def get(self, name: str) -> bytes | None:
        for blobs in reversed(self._by_model.values()):
            data = blobs.get(name)
            if data is not None:
                self.bytes_served += len(data)
                return bytes(data)
        return None
