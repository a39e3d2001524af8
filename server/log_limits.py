"""A rate limit on log lines that peers can cause, so that a flood of bad input cannot flood the log.

Lines past the budget are counted, never lost silently: one summary line says how many were held back. Never
use this for lines that only the coordinator itself causes (round commits, startup); those must all be kept.
"""

from __future__ import annotations

import asyncio
import logging
import time

LINES_PER_SECOND = 5.0  # sustained rate of peer-caused lines, per limiter ...
LINES_BURST = 20  # ... and at once: enough to see what a short burst of bad input was
SUMMARY_EVERY_S = 10.0  # how soon after lines are held back a summary says how many
# nodes joining and leaving: a live swarm's churn is logged in full, a flood of connections is not
MEMBERSHIP_LINES_PER_SECOND = 20.0
MEMBERSHIP_LINES_BURST = 200


class LogLimiter:
    """A token bucket in front of `logger`: at most `rate` lines per second on average, `burst` at once.

    What it holds back it counts, and reports as one "suppressed K similar lines" line `summary_every_s` after the
    first line it held back (a timer on the running event loop), so that a sustained flood costs `rate` lines a
    second plus one summary per period. Without an event loop, the summary comes with the next line let through.
    """

    def __init__(self, logger: logging.Logger, rate: float = LINES_PER_SECOND, burst: int = LINES_BURST,
                 summary_every_s: float = SUMMARY_EVERY_S, clock=time.monotonic) -> None:
        self.logger = logger
        self.rate, self.burst, self.summary_every_s, self.clock = rate, burst, summary_every_s, clock
        self._tokens, self._refilled = float(burst), clock()
        self.suppressed = 0  # lines held back since the last summary
        self._summary_due: asyncio.TimerHandle | None = None

    def info(self, msg: str, *args: object) -> bool:
        """Log an info line if the budget allows; returns whether it was logged."""
        return self._log(logging.INFO, msg, args, exc_info=False)

    def warning(self, msg: str, *args: object) -> bool:
        """Log a warning if the budget allows; returns whether it was logged."""
        return self._log(logging.WARNING, msg, args, exc_info=False)

    def exception(self, msg: str, *args: object) -> bool:
        """Log an error with the traceback of the exception being handled, if the budget allows."""
        return self._log(logging.ERROR, msg, args, exc_info=True)

    def flush(self) -> None:
        """Log how many lines were held back since the last summary, if any."""
        if self._summary_due is not None:
            self._summary_due.cancel()
            self._summary_due = None
        if self.suppressed:
            self.logger.warning("suppressed %d similar lines (more than %g per second)", self.suppressed, self.rate)
            self.suppressed = 0

    def _log(self, level: int, msg: str, args: tuple, exc_info: bool) -> bool:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            self.suppressed += 1
            self._schedule_summary()
            return False
        self._tokens -= 1
        if self.suppressed and self._summary_due is None:  # no timer will report them: the count goes first
            self.flush()
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def _schedule_summary(self) -> None:
        if self._summary_due is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the summary comes with the next line that gets through
            return
        self._summary_due = loop.call_later(self.summary_every_s, self.flush)
