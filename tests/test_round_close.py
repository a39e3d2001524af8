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


async def straggler_lands_while_the_round_closes(data_dir, overlap: bool = False):
    options = SimOptions(workers=2, rounds=3 if overlap else 2, inner_steps=2, batch=4, corpus_bytes=1_000_000,
                         seed=0, out=None, overlap=overlap)
    sim = Simulation(options, load_corpus(None, options.corpus_bytes), data_dir)
    coordinator = sim.coordinator
    sim._task = asyncio.create_task(coordinator.run())
    fast, slow = sim._start(False), sim._start(False)
    if overlap:  # no lockstep: each trains as soon as it can, the slow one into round 2, ahead, while round 1 collects
        sim._expected, sim.released = [fast, slow], options.rounds
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
    for r in range(0 if overlap else options.rounds):
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


@pytest.mark.timeout(120)
def test_with_overlapped_rounds_a_late_update_leaves_the_nodes_update_for_the_round_ahead_to_count(tmp_path):
    # the slow node's round-0 update is decided late in round 1; its updates for round 1 and for round 2 (which
    # arrives while round 1 still collects, ahead) are distinct work and count in full
    history, slow = asyncio.run(straggler_lands_while_the_round_closes(tmp_path, overlap=True))
    assert all(slow.port.results[r]["accepted"] for r in range(3)), slow.port.results
    assert [h["accepted"] for h in history] == [0, 1, 3, 2]
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT round, accepted, weight FROM updates WHERE node_id = ? ORDER BY round",
                          (slow.node_id,)).fetchall()
    assert rows == [(0, 1, STALE_WEIGHT), (1, 1, 1.0), (2, 1, 1.0)]


async def early_update_waits_for_its_round(data_dir):
    """Overlapped rounds: the fast worker sends round 2's update while round 1 still waits for the slow worker (the
    job's first round runs alone)."""
    options = SimOptions(workers=2, rounds=3, inner_steps=2, batch=4, corpus_bytes=1_000_000, seed=0, out=None,
                         overlap=True)
    sim = Simulation(options, load_corpus(None, options.corpus_bytes), data_dir)
    coordinator = sim.coordinator
    sim._task = asyncio.create_task(coordinator.run())
    fast, slow = sim._start(False), sim._start(False)
    sim._expected, sim.released = [fast, slow], options.rounds  # no lockstep: each trains as soon as it can
    encode = slow.port.encode
    seen = {}

    async def straggle(node, work):
        """The slow worker's round-1 update leaves only once the fast one's round-2 update waits in intake."""
        if work.round == 1:
            waiting = lambda: [(d.pending.update.node_id, d.pending.update.round) for d in coordinator.intake.deferred]
            await sim._wait_for(lambda: (fast.node_id, 2) in waiting(), "the fast worker's update of round 2")
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
    # round 2 was open and trained while round 1 collected; the fast worker had its round-1 verdict by then
    assert seen == {"open": 1, "ahead": 2, "fast_verdicts": [0, 1]}
    assert [h["accepted"] for h in status["history"]] == [0, 2, 2, 2]
    assert all(fast.port.results[r]["accepted"] and slow.port.results[r]["accepted"] for r in range(3))
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT round, node_id, accepted, weight FROM updates ORDER BY id").fetchall()
    assert sorted((r, node == fast.node_id, accepted, weight) for r, node, accepted, weight in rows) == [
        (r, is_fast, 1, 1.0) for r in range(3) for is_fast in (False, True)]  # none counted as late
    models = [h["model_hash"] for h in status["history"]]
    assert {(u["round"], u["model_hash"]) for u in uploads} == {(0, models[0]), (1, models[1]), (2, models[1])}


async def failed_settle(data_dir, overlap: bool, background: bool):
    options = SimOptions(workers=2, rounds=4, inner_steps=2, batch=4, corpus_bytes=1_000_000, seed=0, out=None,
                         overlap=overlap, background_settle=background)
    sim = Simulation(options, load_corpus(None, options.corpus_bytes), data_dir)
    coordinator = sim.coordinator
    checkpoints = data_dir / "checkpoints"
    sim._task = asyncio.create_task(coordinator.run())
    workers = [sim._start(False), sim._start(False)]
    sim._expected, sim.released = workers, options.rounds  # no lockstep: each trains as soon as it can
    encode, failing = workers[1].port.encode, []

    async def fail_next_settle(node, work):
        """Round 1's close will not commit: its checkpoint cannot be written (a file where the directory was)."""
        if work.round == 1 and not failing:
            failing.append(work.round)
            await sim._wait_for(lambda: coordinator.committed_rounds() >= 1, "round 0 committed")
            checkpoints.rename(data_dir / "checkpoints.kept")
            checkpoints.write_text("not a directory")
        return await encode(node, work)

    workers[1].port.encode = fail_next_settle
    await sim._wait_for(lambda: coordinator.intake_errors >= 1, "the failed settle")
    taken_back = coordinator.round
    checkpoints.unlink()
    (data_dir / "checkpoints.kept").rename(checkpoints)
    await sim._wait_for(lambda: sim._task.done(), "the job to finish")
    sim._task.result()
    return coordinator.status(), taken_back, workers


# with overlap: both rounds in flight are abandoned; without it and settling before the next round opens, round 2
# opens again on the very model it had, and the nodes must train it again (they once sat idle, taking it for a copy)
@pytest.mark.timeout(180)
@pytest.mark.parametrize("overlap, background", [(True, True), (False, False)])
def test_a_failed_settle_opens_the_rounds_again_from_the_last_commit(tmp_path, overlap, background):
    status, taken_back, workers = asyncio.run(failed_settle(tmp_path, overlap, background))
    assert taken_back == 1  # back to the model after round 0, the last commit
    assert [h["round"] for h in status["history"]] == [0, 1, 2, 3, 4]  # none lost, none repeated
    assert all(h["accepted"] == 2 and h["rejected"] == 0 for h in status["history"][1:]), status["history"]
    assert status["intake"]["errors"] == 1
    notices = [f["message"] for w in workers for e, f in w.port.events if e == "notice"]
    assert any("round_abandoned" in m and "round 2 could not be committed" in m for m in notices), notices
