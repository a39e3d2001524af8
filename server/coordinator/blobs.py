"""The blobs the coordinator serves at `GET /api/blobs/{sha256}`: each published model's chunks and its signed
manifest (shared/manifest.py), kept for the last few rounds so that a node a round behind still finds them.

Never serve a blob under a name that is not the sha256 of its bytes: clients and caches trust the name.
"""

from __future__ import annotations

from collections import OrderedDict

from server.keys import NodeKey
from shared.manifest import Manifest, cut, snapshot_manifest

ROUNDS_SERVED = 2  # the current model's blobs and the previous one's


class BlobStore:
    def __init__(self, key: NodeKey, rounds_served: int = ROUNDS_SERVED):
        self.key = key
        self.rounds_served = rounds_served
        self._by_model: OrderedDict[str, dict[str, bytes | memoryview]] = OrderedDict()  # model hash -> its blobs
        self._manifests: dict[str, str] = {}  # model hash -> its manifest's name
        self.bytes_served = 0

    def publish(self, round_: int, data: bytes) -> Manifest:
        """Cut a model's float32 bytes into chunks, sign their manifest, and serve both; older models beyond
        `rounds_served` stop being served. Returns the signed manifest (its name is `manifest.sha256`)."""
        chunks = cut(data)
        unsigned = snapshot_manifest(round_, data, chunks)
        manifest = Manifest(**{**unsigned.__dict__, "signature": self.key.sign(unsigned.signing_bytes())})
        blobs: dict[str, bytes | memoryview] = dict(zip(manifest.chunks, chunks))
        blobs[manifest.sha256] = manifest.to_bytes()
        self._by_model[manifest.result_hash] = blobs
        self._manifests[manifest.result_hash] = manifest.sha256
        self._by_model.move_to_end(manifest.result_hash)
        while len(self._by_model) > self.rounds_served:
            old, _ = self._by_model.popitem(last=False)
            self._manifests.pop(old, None)
        return manifest

    def manifest_of(self, model_hash: str) -> str:
        """The name of the manifest of a published model; "" when it is not served."""
        return self._manifests.get(model_hash, "")

    def get(self, name: str) -> bytes | None:
        for blobs in reversed(self._by_model.values()):
            data = blobs.get(name)
            if data is not None:
                self.bytes_served += len(data)
                return bytes(data)
        return None
