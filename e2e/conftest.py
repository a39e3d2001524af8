"""e2e fixtures: Debian Chromium driven by Playwright over CDP (e2e/chromium.py), plus the tests/ fixtures.

Every browser a test launches is closed after it, and its console printed when the test failed. Never run
`playwright install`: it downloads a browser, which fails here.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import sync_playwright

from e2e.chromium import NO_WEBGPU_FLAGS, WEBGPU_FLAGS, WEBRTC_FLAGS, BrowserProcess
from tests.conftest import loopback_namespace, processes, pytest_runtest_makereport  # noqa: F401 (fixtures, hook)


@pytest.fixture(scope="session")
def playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture
def chromium(playwright, tmp_path, request):
    """Launch browsers with `chromium(webgpu=True, webrtc=True)`; all close after the test."""
    launched: list[BrowserProcess] = []

    def launch(webgpu: bool = True, webrtc: bool = True) -> BrowserProcess:
        flags = (WEBGPU_FLAGS if webgpu else NO_WEBGPU_FLAGS) + (WEBRTC_FLAGS if webrtc else [])
        b = BrowserProcess(playwright, flags, tmp_path)
        launched.append(b)
        return b

    yield launch
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for b in launched:
        if failed:
            print(f"==== browser console ({b.log_path.name})\n" + "\n".join(b.console[-60:]))
        b.close()
