"""Content-addressed models: a model's bytes cut into chunks of at most 256 KiB, each named by its sha256, and
listed in a manifest that the coordinator signs (round, kind, base and result hash, codec, size, chunk hashes).

A manifest is itself a blob, named by the sha256 of its canonical bytes, so that any holder (the coordinator's
`GET /api/blobs/{sha256}`, a CDN, later a peer) can serve every piece and the receiver checks each against its
name. Never use a byte of a chunk whose hash was not checked, nor a manifest whose signature was not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from shared.identity import canonical_json, signing_bytes

BLOB_CHUNK_BYTES = 256 * 1024
MAX_MODEL_BYTES = 1 << 30  # as shared.wire.MAX_PAYLOAD_BYTES
MAX_CHUNKS = MAX_MODEL_BYTES // BLOB_CHUNK_BYTES
MAX_MANIFEST_BYTES = 128 + 67 * MAX_CHUNKS + 1024  # a quoted 64-hex name and a comma per chunk, and the fields
MAX_BLOB_BYTES = max(BLOB_CHUNK_BYTES, MAX_MANIFEST_BYTES)  # what a node reads of one blob at most
KINDS = ("snapshot", "delta")
_HEX = set("0123456789abcdef")


class ManifestError(ValueError):
    """A manifest or chunk that does not check out: malformed, wrongly signed, or not matching its hash."""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _hex64(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise ManifestError(f"{name} must be 64 lowercase hex characters")
    return value


@dataclass(frozen=True)
class Manifest:
    """What a model's bytes are made of. `base_hash` is "" for a snapshot (a delta names the model it applies to);
    `result_hash` is the sha256 of the model the chunks make; `size` is the total bytes of the chunks."""

    round: int
    kind: str
    base_hash: str
    result_hash: str
    codec: str
    size: int
    chunks: tuple[str, ...]
    signature: str = "0" * 128

    def signing_fields(self) -> dict:
        d = asdict(self)
        del d["signature"]
        d["chunks"] = list(self.chunks)
        return d

    def signing_bytes(self) -> bytes:
        return signing_bytes("manifest", self.signing_fields())

    def to_bytes(self) -> bytes:
        return canonical_json({**self.signing_fields(), "signature": self.signature})

    @property
    def sha256(self) -> str:
        return sha256_hex(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> Manifest:
        """Parse a manifest fetched as blob `name`: its bytes must hash to the name, its fields be in bounds."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"a manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        if sha256_hex(data) != name:
            raise ManifestError("the manifest's bytes do not match its name")
        try:
            d = json.loads(data)
            fields = {k: d[k] for k in ("round", "kind", "base_hash", "result_hash", "codec", "size", "chunks",
                                        "signature")}
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None
        if set(d) != set(fields):
            raise ManifestError(f"unknown manifest fields: {sorted(set(d) - set(fields))}")
        m = cls(**{**fields, "chunks": tuple(fields["chunks"]) if isinstance(fields["chunks"], list) else ()})
        m.check()
        return m

    def check(self) -> None:
        if type(self.round) is not int or self.round < 0:
            raise ManifestError("round must be a non-negative integer")
        if self.kind not in KINDS:
            raise ManifestError(f"kind must be one of {KINDS}")
        if self.kind == "snapshot" and self.base_hash != "":
            raise ManifestError("a snapshot has no base")
        if self.kind == "delta":
            _hex64(self.base_hash, "a delta's base_hash")
        _hex64(self.result_hash, "result_hash")
        if not isinstance(self.codec, str) or len(self.codec) > 64:
            raise ManifestError("codec must be a short string")
        if type(self.size) is not int or not 0 < self.size <= MAX_MODEL_BYTES:
            raise ManifestError(f"size must be in (0, {MAX_MODEL_BYTES}]")
        expected = -(-self.size // BLOB_CHUNK_BYTES)
        if len(self.chunks) != expected:
            raise ManifestError(f"{self.size} bytes are {expected} chunks, not {len(self.chunks)}")
        for i, name in enumerate(self.chunks):
            _hex64(name, f"chunk {i}")
        if not isinstance(self.signature, str) or len(self.signature) != 128 or not set(self.signature) <= _HEX:
            raise ManifestError("signature must be 128 lowercase hex characters")


def cut(data: bytes) -> list[memoryview]:
    """The chunks of `data`: views of BLOB_CHUNK_BYTES, the last one shorter."""
    view = memoryview(data).cast("B")
    return [view[i : i + BLOB_CHUNK_BYTES] for i in range(0, len(view), BLOB_CHUNK_BYTES)]


def snapshot_manifest(round_: int, data: bytes, chunks: list[memoryview]) -> Manifest:
    """The unsigned manifest of a snapshot: the model's float32 bytes as they are."""
    return Manifest(round_, "snapshot", "", sha256_hex(data), "fp32", len(data), tuple(sha256_hex(c) for c in chunks))


def delta_manifest(round_: int, base_hash: str, result_hash: str, codec: str, data: bytes,
                   chunks: list[memoryview]) -> Manifest:
    """The unsigned manifest of a delta: `data` is the codec's encoding of what takes model `base_hash` to
    `result_hash` (every node adds the decoded values to its float32 parameters)."""
    return Manifest(round_, "delta", base_hash, result_hash, codec, len(data), tuple(sha256_hex(c) for c in chunks))


def assemble(manifest: Manifest, chunks: list[bytes], checked: bool = False) -> bytes:
    """The model from its chunks, each checked against its name (unless the caller did: `checked`) and the whole
    against the result hash."""
    if len(chunks) != len(manifest.chunks):
        raise ManifestError(f"{len(chunks)} chunks for a manifest of {len(manifest.chunks)}")
    for i, (name, chunk) in enumerate(zip(manifest.chunks, chunks)):
        if len(chunk) > BLOB_CHUNK_BYTES or (not checked and sha256_hex(chunk) != name):
            raise ManifestError(f"chunk {i} does not match its name {name[:12]}…")
    data = b"".join(chunks)
    if len(data) != manifest.size:
        raise ManifestError(f"the chunks hold {len(data)} bytes, the manifest says {manifest.size}")
    if manifest.kind == "snapshot" and sha256_hex(data) != manifest.result_hash:
        raise ManifestError("the assembled snapshot does not match the signed model hash")
    return data
