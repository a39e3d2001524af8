"""The log limiter: a flood of peer-caused lines costs a bounded log, and what it held back is counted."""

from __future__ import annotations

import asyncio
import logging

from server.log_limits import LogLimiter

LOGGER = "swarmgrad.test.limits"


def limiter(now: list[float], **kw) -> LogLimiter:
    return LogLimiter(logging.getLogger(LOGGER), clock=lambda: now[0], **kw)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_lines_beyond_the_burst_are_held_back_and_counted_in_one_summary(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    now = [0.0]
    limits = limiter(now, rate=2.0, burst=3)
    logged = [limits.warning("bad frame %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert messages(caplog) == ["bad frame 0", "bad frame 1", "bad frame 2"]
    now[0] += 0.5  # one line's worth of budget back
    assert limits.warning("bad frame %d", 10)
    assert messages(caplog)[3:] == ["suppressed 7 similar lines (more than 2 per second)", "bad frame 10"]
    assert limits.suppressed == 0


def test_exceptions_keep_their_traceback_and_share_the_budget(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    now = [0.0]
    limits = limiter(now, rate=1.0, burst=1)
    for _ in range(3):
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            limits.exception("error while serving")
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert records[0].exc_info[0] is RuntimeError
    assert limits.suppressed == 2


def test_a_summary_follows_a_flood_that_stops(caplog):
    caplog.set_level(logging.WARNING, LOGGER)

    async def flood() -> None:
        limits = limiter([0.0], rate=1.0, burst=2, summary_every_s=0.01)  # a stopped clock: no budget comes back
        for i in range(50):
            limits.warning("line %d", i)
        await asyncio.sleep(0.2)  # nothing more comes: the timer reports what was held back

    asyncio.run(flood())
    assert messages(caplog) == ["line 0", "line 1", "suppressed 48 similar lines (more than 1 per second)"]


def test_in_a_sustained_flood_the_summary_comes_once_per_period_not_with_every_line(caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    now = [0.0]

    async def flood() -> None:
        limits = limiter(now, rate=1.0, burst=1, summary_every_s=0.05)
        for second in range(3):  # one line a second gets through; nine are held back each second
            for i in range(10):
                limits.warning("second %d line %d", second, i)
            now[0] += 1.0
        await asyncio.sleep(0.2)

    asyncio.run(flood())
    assert messages(caplog) == ["second 0 line 0", "second 1 line 0", "second 2 line 0",
                                "suppressed 27 similar lines (more than 1 per second)"]


def test_info_lines_keep_their_level_and_share_the_budget(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    now = [0.0]
    limits = limiter(now, rate=1.0, burst=2)
    assert [limits.info("node %d joined", i) for i in range(4)] == [True, True, False, False]
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER] == [
        (logging.INFO, "node 0 joined"), (logging.INFO, "node 1 joined")]
