"""Round-commit latency of the PostgreSQL store against SQLite (the baseline), measured in the same run.

Never assert a speed target here, and never reach anything but a PostgreSQL server this script starts on 127.0.0.1.

usage: python -m bench.bench_store [--updates 10,100,1000] [--rounds 15]

For each size N and each database, a fresh store and the real books (server.coordinator.governor.Governor) close
--rounds rounds of N nodes' accepted, aggregated updates, the way Coordinator._close_round does: settle (rewards,
the one-time grants and stakes: about 1 to 3 ledger entries per update), the boundary, a signed round record, and
one Store.commit_round with the updates, their ledger entries, every balance and the governance state. Only the
commit is timed; the median over the rounds is printed, with PostgreSQL / SQLite. SQLite is the data directory's
file (WAL, synchronous=FULL); PostgreSQL is Debian's server, initdb'd into a temporary directory (tests/postgres.py)
with fsync on, so that both commits are durable, and reached over TCP on loopback.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from server.coordinator.governor import Governor, UpdateOutcome
from server.coordinator.store import RoundRecord, Store, UpdateRecord, open_store
from server.keys import NodeKey
from shared.rewards import round_record_bytes
from tests.postgres import PostgresServer, postgres_bin_dir

GOOD_UPDATE = {"pseudo_gradient_norm": 3.0, "loss": 2.0, "numel": 10, "expected_numel": 10, "updates_this_round": 0,
               "staleness": 0, "tokens": 1_000}


def commit_times(store: Store, nodes: int, rounds: int) -> tuple[list[float], int]:
    """Seconds per commit of `rounds` rounds of `nodes` accepted updates each, and the ledger entries written."""
    key = NodeKey()
    governor = Governor(store, key, {})
    node_ids = [NodeKey().node_id for _ in range(nodes)]
    for node_id in node_ids:
        store.touch_node(node_id, "trainer")
    times, entries = [], 0
    for round_ in range(rounds + 1):
        outcomes, updates = [], []
        if round_ > 0:
            for i, node_id in enumerate(node_ids):
                decision = governor.check_update(round_ - 1, node_id, GOOD_UPDATE)
                outcomes.append(UpdateOutcome(node_id, decision, 1_000, 500_000 + i, True, verified=True))
                updates.append(UpdateRecord(round_ - 1, node_id, True, "", 1_000, 5, 3.0, 2.0, 4000, 1.0,
                                            time.time(), 500_000 + i, True))
        governor.settle(round_, outcomes)
        governor.boundary(round_)
        head = governor.ledger.head if round_ else ""
        model_hash = f"{round_:064x}"
        now = time.time()
        record = RoundRecord(round_, model_hash, f"round-{round_:06d}.ckpt", "0" * 64, 2.0, len(updates), 0,
                             1_000 * len(updates), 4000 * len(updates), now - 1, now, now + 60, head,
                             key.sign(round_record_bytes(round_, model_hash, head)))
        books = governor.snapshot()
        start = time.perf_counter()
        store.commit_round(record, updates, books["ledger"], governor.ledger.balances(), books["meta"],
                           books["proposals"])
        elapsed = time.perf_counter() - start
        governor.committed()
        if round_ > 0:  # round 0 commits nothing but the job's first record
            times.append(elapsed)
            entries += len(books["ledger"])
    return times, entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__.splitlines()[0])
    p.add_argument("--updates", default="10,100,1000", help="updates per round, comma-separated")
    p.add_argument("--rounds", type=int, default=15, help="rounds timed per size and database (median)")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.updates.split(",")]
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql; ./dev setup does)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-"))
    postgres_dir = Path(tempfile.mkdtemp(prefix="bench-store-postgres-"))  # handed to postgres's own user
    server = PostgresServer(postgres_dir, bin_dir, durable=True)
    try:
        print(f"{'updates':>8}  {'entries':>8}  {'SQLite ms':>10}  {'PostgreSQL ms':>14}  {'PostgreSQL / SQLite':>20}")
        for n in sizes:
            sqlite_store = open_store(workdir / f"sqlite-{n}" / "state.db")
            sqlite_times, entries = commit_times(sqlite_store, n, args.rounds)
            sqlite_store.close()
            postgres_store = open_store(server.new_database())
            postgres_times, _ = commit_times(postgres_store, n, args.rounds)
            postgres_store.close()
            sqlite_ms, postgres_ms = (1000 * statistics.median(t) for t in (sqlite_times, postgres_times))
            print(f"{n:>8}  {entries // args.rounds:>8}  {sqlite_ms:>10.1f}  {postgres_ms:>14.1f}  "
                  f"{postgres_ms / sqlite_ms:>19.2f}x", flush=True)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(postgres_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
