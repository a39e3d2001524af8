"""An update that arrives while its round is being aggregated counts once, in the next round, as a late one;
the node's own update for that next round counts as well.

The real coordinator with simulated workers over in-process links (server/sim/), so the frames are the
real signed Updates and payloads; the straggler's deadline is passed by hand to make the race deterministic.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from server.coordinator.intake import STALE_WEIGHT
from server.corpus import load_corpus
from server.sim import SimOptions, Simulation


async def straggler_lands_while_the_round_closes(data_dir):
    options = SimOptions(workers=2, rounds=2, inner_steps=2, batch=4, corpus_bytes=1_000_000, seed=0, out=None)
    sim = Simulation(options, load_corpus(None, options.corpus_bytes), data_dir)
    coordinator = sim.coordinator
    sim._task = asyncio.create_task(coordinator.run())
    fast, slow = sim._start(False), sim._start(False)
    encode = slow.port.encode
    seen_closing = []

    async def straggle(node, work):
        """The slow worker's round-0 update leaves only once that round closes with the fast one's alone."""
        if work.round == 0:
            await sim._wait_for(lambda: 0 in fast.port.results, "the fast worker's verdict")
            closing = coordinator.open_round
            closing.deadline = time.time()  # the deadline passes with one update in: the round closes without it
            coordinator.changed.set()
            while not closing.closing:
                await asyncio.sleep(0)
            seen_closing.append(0 not in slow.port.results)  # not told "accepted" by a round that would not count it
        return await encode(node, work)

    slow.port.encode = straggle
    for r in range(options.rounds):
        await sim._round(r)
    await sim._wait_for(lambda: sim._task.done(), "the job to finish")
    sim._task.result()
    assert seen_closing == [True]
    return coordinator.status()["history"], slow


@pytest.mark.timeout(120)
def test_an_update_arriving_while_its_round_closes_counts_in_the_next_round_as_late(tmp_path):
    history, slow = asyncio.run(straggler_lands_while_the_round_closes(tmp_path))
    assert slow.port.results[0]["accepted"] and slow.port.results[1]["accepted"]
    assert [h["accepted"] for h in history] == [0, 1, 3]  # round 1: fast's; round 2: slow's late one, both new
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT round, node_id, accepted, weight FROM updates ORDER BY id").fetchall()
    assert sorted((r, accepted, weight) for r, node, accepted, weight in rows if node == slow.node_id) == [
        (0, 1, STALE_WEIGHT), (1, 1, 1.0)]
    assert len(rows) == 4


async def early_update_waits_for_its_round(data_dir):
    """Overlapped rounds: the fast worker sends round 1's update while round 0 still waits for the slow worker."""
    options = SimOptions(workers=2, rounds=2, inner_steps=2, batch=4, corpus_bytes=1_000_000, seed=0, out=None,
                         overlap=True)
    sim = Simulation(options, load_corpus(None, options.corpus_bytes), data_dir)
    coordinator = sim.coordinator
    sim._task = asyncio.create_task(coordinator.run())
    fast, slow = sim._start(False), sim._start(False)
    sim._expected, sim.released = [fast, slow], options.rounds  # no lockstep: each trains as soon as it can
    encode = slow.port.encode
    seen = {}

    async def straggle(node, work):
        """The slow worker's round-0 update leaves only once the fast one's round-1 update waits in intake."""
        if work.round == 0:
            waiting = lambda: [(d.pending.update.node_id, d.pending.update.round) for d in coordinator.intake.deferred]
            await sim._wait_for(lambda: (fast.node_id, 1) in waiting(), "the fast worker's update of round 1")
            status = coordinator.status()
            seen.update(open=status["open_round"]["round"], ahead=status["next_round"]["round"],
                        fast_verdicts=sorted(fast.port.results))
        return await encode(node, work)

    slow.port.encode = straggle
    await sim._wait_for(lambda: sim._task.done(), "the job to finish")
    sim._task.result()
    return coordinator.status(), seen, fast, slow, sim.uploads


@pytest.mark.timeout(120)
def test_an_overlapped_rounds_update_waits_for_its_round_and_counts_in_full(tmp_path):
    status, seen, fast, slow, uploads = asyncio.run(early_update_waits_for_its_round(tmp_path))
    # round 1 was open and trained while round 0 collected; the fast worker had its round-0 verdict by then
    assert seen == {"open": 0, "ahead": 1, "fast_verdicts": [0]}
    assert [h["accepted"] for h in status["history"]] == [0, 2, 2]
    assert all(fast.port.results[r]["accepted"] and slow.port.results[r]["accepted"] for r in (0, 1))
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT round, node_id, accepted, weight FROM updates ORDER BY id").fetchall()
    assert sorted((r, node == fast.node_id, accepted, weight) for r, node, accepted, weight in rows) == [
        (0, False, 1, 1.0), (0, True, 1, 1.0), (1, False, 1, 1.0), (1, True, 1, 1.0)]  # none counted as late
    initial = status["history"][0]["model_hash"]
    assert {(u["round"], u["model_hash"]) for u in uploads} == {(0, initial), (1, initial)}
