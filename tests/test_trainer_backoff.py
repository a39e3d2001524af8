"""The trainer's reconnect policy: outages back off, a good connection starts the backoff afresh, and only a
permanent refusal ends the trainer (the sessions here are scripted; the delays are what Trainer.run decides)."""

from __future__ import annotations

import asyncio

from server import trainer as trainer_module
from server.trainer import RECONNECT_MAX_S, RECONNECT_MIN_S, Disconnected, FatalError, JobFinished, Trainer, \
    TrainerOptions


def run_script(script: list[tuple[bool, Exception]], monkeypatch) -> tuple[int, list[float]]:
    """Run Trainer.run over sessions that each end as scripted: (welcomed first?, the exception it ends with)."""
    t = Trainer(TrainerOptions("http://127.0.0.1:9", device="cpu", progress=False))
    sessions = iter(script)
    delays: list[float] = []

    async def session() -> None:
        welcomed, ending = next(sessions)
        t.welcomed = welcomed
        raise ending

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(t, "_session", session)
    monkeypatch.setattr(trainer_module.asyncio, "sleep", sleep)
    return asyncio.run(t.run()), delays


def test_the_backoff_starts_afresh_after_a_good_connection(monkeypatch):
    outage = Disconnected("coordinator gone")
    script = [(False, outage)] * 6 + [(True, outage), (False, outage), (False, JobFinished("done"))]
    code, delays = run_script(script, monkeypatch)
    assert code == 0
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, RECONNECT_MAX_S]
    assert delays[6:] == [RECONNECT_MIN_S, 2 * RECONNECT_MIN_S]  # after the good connection: from the start


def test_a_passing_refusal_is_retried_and_a_permanent_one_ends_the_trainer(monkeypatch):
    busy = Disconnected("the coordinator cannot take this node now: [busy] ...")
    code, delays = run_script([(False, busy), (False, busy), (False, FatalError("[denied] quarantined"))],
                              monkeypatch)
    assert code == 2 and delays == [0.5, 1.0]
