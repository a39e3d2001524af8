"""Debian Chromium launched as a plain subprocess and driven by Playwright over CDP (tests and benchmarks).

Launching it ourselves keeps our --disable-features list the only one (Playwright's own launch merges in its
list). Never run `playwright install`: it downloads a browser, which fails here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page

from tests.processes import LoggedProcess

CHROMIUM = "/usr/bin/chromium"
BASE_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
]
WEBGPU_FLAGS = ["--enable-unsafe-webgpu"]  # SwiftShader's WebGPU adapter on machines without a GPU
NO_WEBGPU_FLAGS = ["--disable-webgpu"]
# Inside a loopback-only namespace Chromium gathers ICE candidates only with both of these (ENVIRONMENT.md).
WEBRTC_FLAGS = ["--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"]
DEVTOOLS_TIMEOUT_S = 30.0


class BrowserProcess(LoggedProcess):
    """One Chromium with a fresh profile; `page()` opens a tab whose console is kept for failure reports."""

    def __init__(self, playwright, flags: list[str], log_dir: Path):
        self.profile = Path(tempfile.mkdtemp(prefix="swarmgrad-chromium-"))
        self.log_path = log_dir / f"chromium-{time.monotonic_ns()}.log"
        super().__init__([CHROMIUM, *BASE_FLAGS, *flags, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                          "about:blank"], self.log_path)
        self.console: list[str] = []
        try:
            port = self._devtools_port()
            self.browser = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        # Chromium writes the port it chose into the profile once DevTools listens
        marker = self.profile / "DevToolsActivePort"
        deadline = time.time() + DEVTOOLS_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if marker.exists():
                first = marker.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open DevTools within {DEVTOOLS_TIMEOUT_S}s")

    def page(self) -> Page:
        context = self.browser.contexts[0]
        page = context.new_page()
        page.on("console", lambda m: self.console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"[pageerror] {e}"))
        return page

    def close(self) -> None:
        try:
            if getattr(self, "browser", None) is not None:
                self.browser.close()
        finally:
            self.stop()
            shutil.rmtree(self.profile, ignore_errors=True)
