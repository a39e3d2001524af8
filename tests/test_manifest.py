"""Content-addressed models (shared/manifest.py) and the coordinator's blob store: a model's chunks and its signed
manifest check out against their names, and anything altered is refused with a ManifestError."""

from __future__ import annotations

import hashlib
import json

import pytest

from server.coordinator.blobs import BlobStore
from server.keys import NodeKey, verify
from shared.manifest import BLOB_CHUNK_BYTES, Manifest, ManifestError, assemble, cut, snapshot_manifest

MODEL = bytes(range(256)) * 2500  # 640,000 bytes: two full chunks and a short one


def published(store: BlobStore, round_: int = 3, data: bytes = MODEL) -> tuple[Manifest, dict[str, bytes]]:
    manifest = store.publish(round_, data)
    return manifest, {name: store.get(name) for name in (manifest.sha256, *manifest.chunks)}


def test_a_published_model_reassembles_from_its_named_chunks_under_a_valid_signature():
    key = NodeKey()
    manifest, blobs = published(BlobStore(key))
    parsed = Manifest.from_bytes(blobs[manifest.sha256], manifest.sha256)
    assert parsed == manifest and parsed.kind == "snapshot" and parsed.round == 3
    verify(key.node_id, parsed.signing_bytes(), parsed.signature)  # raises when it does not verify
    assert len(parsed.chunks) == 3 and [len(blobs[c]) for c in parsed.chunks] == [BLOB_CHUNK_BYTES] * 2 + [
        len(MODEL) - 2 * BLOB_CHUNK_BYTES]
    assert all(hashlib.sha256(blobs[c]).hexdigest() == c for c in parsed.chunks)
    assert assemble(parsed, [blobs[c] for c in parsed.chunks]) == MODEL
    assert parsed.result_hash == hashlib.sha256(MODEL).hexdigest()


def test_an_altered_chunk_or_manifest_is_refused():
    manifest, blobs = published(BlobStore(NodeKey()))
    chunks = [bytearray(blobs[c]) for c in manifest.chunks]
    chunks[1][7] ^= 1
    with pytest.raises(ManifestError, match="chunk 1"):
        assemble(manifest, [bytes(c) for c in chunks])
    with pytest.raises(ManifestError, match="4 chunks for a manifest of 3"):
        assemble(manifest, [blobs[c] for c in manifest.chunks] + [b"x"])
    text = blobs[manifest.sha256].replace(b'"round":3', b'"round":4')
    with pytest.raises(ManifestError, match="do not match its name"):
        Manifest.from_bytes(text, manifest.sha256)
    forged = Manifest(**{**manifest.__dict__, "round": 4})  # re-named to match, but the signature is for round 3
    with pytest.raises(Exception, match="signature"):
        verify(NodeKey().node_id, forged.signing_bytes(), forged.signature)


@pytest.mark.parametrize("change,message", [
    ({"kind": "patch"}, "kind"),
    ({"base_hash": "ab" * 32}, "no base"),
    ({"size": 1}, "chunks, not"),
    ({"size": 0}, "size"),
    ({"chunks": ["XY" * 32] * 3}, "chunk 0"),
    ({"result_hash": "short"}, "result_hash"),
    ({"round": -1}, "round"),
    ({"signature": "00"}, "signature"),
    ({"extra": 1}, "unknown manifest fields"),
])
def test_a_malformed_manifest_is_a_typed_error(change, message):
    manifest, _ = published(BlobStore(NodeKey()))
    fields = {**json.loads(manifest.to_bytes()), **change}
    data = json.dumps(fields).encode()
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(data, hashlib.sha256(data).hexdigest())


def test_not_json_is_a_typed_error():
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_bytes(b"{not json", hashlib.sha256(b"{not json").hexdigest())


def test_the_store_serves_the_last_two_models_and_forgets_older_ones():
    store = BlobStore(NodeKey())
    first, _ = published(store, 1, MODEL)
    second, _ = published(store, 2, MODEL[::-1])
    third, _ = published(store, 3, MODEL[1:] + b"!")
    assert store.manifest_of(first.result_hash) == "" and store.get(first.sha256) is None
    assert store.manifest_of(third.result_hash) == third.sha256 and store.get(second.sha256) is not None
    assert store.get("0" * 64) is None


def test_cut_and_the_unsigned_manifest_agree():
    chunks = cut(MODEL)
    manifest = snapshot_manifest(0, MODEL, chunks)
    assert b"".join(bytes(c) for c in chunks) == MODEL and manifest.size == len(MODEL)


def test_a_published_delta_is_signed_names_its_base_and_applies_to_the_published_model():
    import numpy as np

    from server.codecs import apply_delta, decode_numpy
    from shared import compress

    key, spec = NodeKey(), compress.parse_codec("int8")
    base = np.linspace(-1, 1, 70_000, dtype=np.float32)
    target = base + np.float32(0.01) * np.cos(np.arange(base.size, dtype=np.float32))
    payload = compress.encode(spec, (target - base).tolist())
    new = apply_delta(base, spec, payload)
    assert new.dtype == np.float32 and np.array_equal(new, base + decode_numpy(spec, payload, base.size))
    assert np.abs(new - target).max() < 1e-4  # int8 blockwise: a small, bounded error (error feedback keeps it)

    store = BlobStore(key)
    base_hash = hashlib.sha256(base.tobytes()).hexdigest()
    snapshot = store.publish(5, new.tobytes(), (base_hash, "int8", payload))
    name = store.delta_of(snapshot.result_hash)
    delta = Manifest.from_bytes(store.get(name), name)
    verify(key.node_id, delta.signing_bytes(), delta.signature)
    assert (delta.kind, delta.round, delta.base_hash, delta.result_hash, delta.codec) == (
        "delta", 5, base_hash, snapshot.result_hash, "int8")
    joined = assemble(delta, [store.get(c) for c in delta.chunks])
    assert joined == payload and hashlib.sha256(apply_delta(base, spec, joined).tobytes()).hexdigest() == \
        snapshot.result_hash


def test_a_delta_without_a_base_is_malformed():
    manifest, _ = published(BlobStore(NodeKey()))
    fields = {**json.loads(manifest.to_bytes()), "kind": "delta", "base_hash": ""}
    data = json.dumps(fields).encode()
    with pytest.raises(ManifestError, match="base_hash"):
        Manifest.from_bytes(data, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("codec", ["int8", "int8:block=64", "fp16", "fp32", "topk:fraction=0.1"])
def test_the_stdlib_and_numpy_apply_a_delta_to_the_same_bytes(codec):
    """The browser applies deltas in the standard library, trainers and the coordinator with numpy: every node
    must hold the same bytes, whatever the values (tiny, huge, negative, zero, far apart in exponent)."""
    import random

    import numpy as np

    from server.codecs import apply_delta as numpy_apply
    from shared import compress

    rng = random.Random(codec)
    n = 20_000
    base = np.array([rng.choice([0.0, -0.0, 1e-30, 3e-8, -2.5, 1e4, 7e20]) * rng.uniform(-1, 1) + rng.gauss(0, 0.1)
                     for _ in range(n)], np.float32)
    delta = [rng.choice([rng.gauss(0, 1e-3), rng.gauss(0, 10.0), 0.0, 1e-12]) for _ in range(n)]
    spec = compress.parse_codec(codec)
    payload = compress.encode(spec, delta)
    assert compress.apply_delta(base.tobytes(), spec, payload) == numpy_apply(base, spec, payload).tobytes()
