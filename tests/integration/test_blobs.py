"""The model as content-addressed blobs: a real coordinator serves its model's chunks and signed manifest at
/api/blobs/{sha256} as immutable, cacheable HTTP, and a real trainer fetches the model that way: the snapshot when
it holds nothing, then only each round's delta, which it applies and checks against the signed hash."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from server.keys import verify
from shared.manifest import Manifest, assemble


def get(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()  # headers: case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_the_model_is_served_as_signed_immutable_chunks_and_a_trainer_fetches_it_so(processes, loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--rounds", "2", "--verify-share", "0")
    status = coordinator.wait_ready()
    blobs = coordinator.url + "/api/blobs/"
    code, headers, raw = get(blobs + status["manifest"])
    assert code == 200 and headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["ETag"] == f'"{status["manifest"]}"'
    manifest = Manifest.from_bytes(raw, status["manifest"])
    verify(status["coordinator_id"], manifest.signing_bytes(), manifest.signature)
    assert (manifest.kind, manifest.round, manifest.result_hash) == ("snapshot", 0, status["model_hash"])
    chunks = [get(blobs + name)[2] for name in manifest.chunks]
    assert len(assemble(manifest, chunks)) == 4 * status["job"]["params"]

    assert get(blobs + manifest.chunks[0], {"If-None-Match": f'"{manifest.chunks[0]}"'})[0] == 304
    code, _, body = get(blobs + "0" * 64)
    assert code == 404 and json.loads(body)["code"] == "not_found"
    code, _, body = get(blobs + "NOT-A-HASH")
    assert code == 400 and json.loads(body)["code"] == "bad_name"

    trainer = processes.trainer(coordinator.url, "--log-level", "INFO")
    assert trainer.wait(240) == 0, trainer.output()
    log = trainer.output()
    fetched = re.findall(r"round (\d+): model fetched as (\d+) chunks \((\d+) bytes\)", log)
    assert [(int(r), int(n), int(b)) for r, n, b in fetched] == [(1, len(manifest.chunks), manifest.size)]
    # round 2: the node holds round 1's model, so it fetches only the int8 delta, applies it and checks the hash
    (delta_line,) = re.findall(r"round 2: model updated by a delta of (\d+) chunks \((\d+) bytes\)", log)
    assert 0 < int(delta_line[1]) < manifest.size / 3.5  # int8 blockwise (deflated): over 3.5x smaller than fp32
    assert "fetching the snapshot instead" not in log and "getting the model another way" not in log
    final = coordinator.wait_for(lambda s: s["state"] == "finished", 30, "the job to finish")
    assert final["manifest"] != status["manifest"] and get(blobs + final["manifest"])[0] == 200
    assert [h["accepted"] for h in final["history"]] == [0, 1, 1]
    # what the coordinator sent while each round was open: the snapshot in round 1, only the delta in round 2
    out = [h["coordinator_bytes_out"] for h in final["history"]]
    assert out[1] > manifest.size and int(delta_line[1]) < out[2] < manifest.size / 3, out
