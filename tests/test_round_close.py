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
