"""The coordinator serves the browser node's Python bundle (/bundle.zip) that Pyodide unpacks: contents and caching."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from server.net.bundle import BUNDLE_SOURCES, PROJECT_ROOT, BundleCache, build_bundle


def source_copy(tmp_path: Path) -> Path:
    """The bundle's source folders, copied, so that a test may touch and edit them."""
    root = tmp_path / "src"
    for folder, _, _ in BUNDLE_SOURCES:
        shutil.copytree(PROJECT_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"),
                        copy_function=shutil.copyfile)  # contents only: the copies get new mtimes
    return root


def test_bundle_bytes_depend_only_on_the_source_files(tmp_path):
    root = source_copy(tmp_path)
    cache = BundleCache(root)
    first = cache.get()
    assert first.etag == f'"{hashlib.sha256(first.data).hexdigest()}"'
    assert first == build_bundle(PROJECT_ROOT)  # the same files elsewhere, with other mtimes: the same bytes

    # every file gets another modification time (years apart, so even a zip's 2-second timestamps differ): the
    # cache notices and rebuilds, and the rebuilt bundle is byte for byte the same, so browsers keep their copy
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        os.utime(path, ns=(0, (1_000_000_000 + 7_777_777 * i) * 10**9))
    touched = cache.get()
    assert touched is not first  # rebuilt, not served from the cache
    assert touched.data == first.data and touched.etag == first.etag

    # a changed source changes the bytes and the ETag: the cache busts
    wire = root / "shared" / "wire.py"
    wire.write_text(wire.read_text() + "\n# changed\n")
    changed = cache.get()
    assert changed.data != first.data and changed.etag != first.etag
    assert zipfile.ZipFile(io.BytesIO(changed.data)).read("shared/wire.py").endswith(b"# changed\n")


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
