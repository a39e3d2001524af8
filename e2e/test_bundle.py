"""The coordinator serves the browser node's Python bundle (/bundle.zip) that Pyodide unpacks: contents and caching."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
import zipfile

import pytest

from server.net.bundle import build_bundle


def test_bundle_bytes_depend_only_on_the_source_files():
    first, second = build_bundle(), build_bundle()
    assert first.data == second.data and first.etag == second.etag
    assert first.etag == f'"{hashlib.sha256(first.data).hexdigest()}"'


def test_coordinator_serves_the_bundle_with_an_etag_and_revalidates_it(processes):
    coordinator = processes.coordinator()
    coordinator.wait_ready()
    with urllib.request.urlopen(coordinator.url + "/bundle.zip", timeout=10) as r:
        body, etag = r.read(), r.headers["ETag"]
        assert r.headers["Content-Type"] == "application/zip"
        assert r.headers["Cache-Control"] == "no-cache"
    assert etag == f'"{hashlib.sha256(body).hexdigest()}"'
    names = set(zipfile.ZipFile(io.BytesIO(body)).namelist())
    assert {"shared/wire.py", "shared/identity.py", "shared/model.py", "kernels/trainer.py", "kernels/matmul.wgsl",
            "kernels/device_browser.py", "kernels/pseudo_gradient.wgsl", "browser_node.py", "browser_probes.py"} <= names
    # only the protocol, the kernels and the page's Python: nothing of the server, no bytecode
    assert all(n.split("/")[0] in ("shared", "kernels") or "/" not in n for n in names), names
    assert all(n.endswith((".py", ".wgsl", ".toml")) for n in names), names

    request = urllib.request.Request(coordinator.url + "/bundle.zip", headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(request, timeout=10)
    assert not_modified.value.code == 304
    assert not_modified.value.read() == b""
