"""The Python bundle that the browser node unpacks into Pyodide: shared/, kernels/ and the page's Python entry.

Built in memory as a zip (pyodide.unpackArchive takes it as is; micropip is not available offline) and
rebuilt only when a source file changes. Never put anything in it but files from the allowed source folders.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
# (source folder, folder inside the zip, file suffixes shipped)
BUNDLE_SOURCES = (
    ("shared", "shared", (".py", ".toml")),
    ("kernels", "kernels", (".py", ".wgsl")),
    ("browser", "", (".py",)),  # the browser's Python entry lands at the top of site-packages
)
# A fixed timestamp keeps the zip's bytes (and so its ETag) a function of the files' contents only.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Bundle:
    data: bytes
    etag: str  # a strong ETag: the quoted sha256 of `data`
    files: tuple[str, ...]  # the archive's member names


def _sources(root: Path) -> list[tuple[Path, str]]:
    found = []
    for folder, target, suffixes in BUNDLE_SOURCES:
        base = root / folder
        for path in sorted(base.iterdir() if base.is_dir() else ()):
            if path.is_file() and path.suffix in suffixes:
                found.append((path, f"{target}/{path.name}" if target else path.name))
    return found


def build_bundle(root: Path = PROJECT_ROOT) -> Bundle:
    """Zip the bundle's sources under `root`; the same files always give the same bytes."""
    sources = _sources(root)
    if not any(name.startswith("kernels/") for _, name in sources):
        raise FileNotFoundError(f"no kernels/ sources under {root}: the browser node cannot train without them")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, name in sources:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    data = out.getvalue()
    return Bundle(data, f'"{hashlib.sha256(data).hexdigest()}"', tuple(name for _, name in sources))


class BundleCache:
    """Serves the current bundle, rebuilding it when a source file's size or mtime changes (cheap to check)."""

    def __init__(self, root: Path = PROJECT_ROOT):
        self.root = root
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._bundle: Bundle | None = None

    def _current_stamp(self) -> tuple:
        stamp = []
        for path, name in _sources(self.root):
            st = path.stat()
            stamp.append((name, st.st_size, st.st_mtime_ns))
        return tuple(stamp)

    def get(self) -> Bundle:
        with self._lock:
            stamp = self._current_stamp()
            if self._bundle is None or stamp != self._stamp:
                self._bundle = build_bundle(self.root)
                self._stamp = stamp
            return self._bundle


def bundle_endpoint(cache: BundleCache):
    """A Starlette endpoint serving the bundle with its ETag; a matching If-None-Match gets 304 and no body."""
    import asyncio

    from starlette.requests import Request
    from starlette.responses import Response

    async def endpoint(request: Request) -> Response:
        bundle = await asyncio.to_thread(cache.get)
        headers = {"ETag": bundle.etag, "Cache-Control": "no-cache"}  # always revalidate: code changes must show
        if bundle.etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(bundle.data, media_type="application/zip", headers=headers)

    return endpoint
