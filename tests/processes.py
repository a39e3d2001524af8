"""A child process of the tests (a coordinator, a trainer, coturn, PostgreSQL, Chromium): its command, with its
output in a log file that a failing test prints, stopped gently and then killed.

Never leave a child running after its test: stop() waits for it, and kills it when it does not leave in time.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


class LoggedProcess:
    """`argv` running with stdout and stderr in `log_path`. stop() sends `stop_signal`, waits `stop_grace` seconds,
    then kills; the log is closed either way."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None,
                 stop_signal: int = signal.SIGTERM, stop_grace: float = 10.0):
        self.log_path, self.stop_signal, self.stop_grace = log_path, stop_signal, stop_grace
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
