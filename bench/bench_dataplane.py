"""The data plane with real processes: what the coordinator sends per round, where each node's model bytes come from,
and the round overhead, for the star (--peers 0) against the peer mesh (--peers K) at N trainers; beside them,
hivemind's DecentralizedAverager all-reducing as many float32 values among as many peers, in the same run.

usage: python -m bench.bench_dataplane [--nodes 2,4,8] [--rounds 4] [--batch 4] [--mesh-peers 4] [--codec fp32]
                                      [--listen] [--no-star] [--timeout 1800] [--logs DIR] [--no-hivemind]
                                      [--hivemind-repeat 3]

--listen adds a third layout, the mesh with every trainer started with `--listen 127.0.0.1:0` (peers' blobs over
plain HTTP instead of data channels: server/net/blob_http.py).

Run from outside a namespace, it installs hivemind into a venv of its own (that needs the network), then runs itself
again in a loopback-only network namespace (`unshare -n`, then `ip link set lo up`; root). It never sends a byte
beyond 127.0.0.1. Each configuration is a fresh coordinator (`--inner-steps 1`, so that compute does not hide the
data plane; `--verify-share 0`, so that spot checks add no compute) and N `python -m server trainer` processes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from server.coordinator.store import Store
from shared.model import model_config, num_parameters
from tests.conftest import ROOT, Coordinator, Process, only_loopback_interfaces

MB = 1e6
POLL_S = 2.0
RUN_TIMEOUT_S = 1800.0  # one configuration (a coordinator and its N trainers), from start to the job's end
TRAINER_EXIT_S = 60.0  # trainers leave by themselves once the job has finished
COORDINATOR_READY_S = 180.0
HIVEMIND_REPEAT = 3
HIVEMIND_TIMEOUT_S = 900.0
PIP_TIMEOUT_S = 1800.0
HIVEMIND_SCRIPT = Path(__file__).with_name("hivemind_allreduce.py")
GOAL_DELTAS_PER_ROUND = 2.0  # issue 11: the coordinator's egress per round at most two deltas' worth at N = 8

# trainer log lines (server/trainer.py's TorchPort.report; the log's asctime is local time with milliseconds)
STAMP = r"(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
JOINED = re.compile(r"joined \S+ as (?P<node>[0-9a-f]{12})… over (?P<path>\w+)")
MODEL_BLOBS = re.compile(STAMP + r" INFO \S+: round (?P<round>\d+): (?P<what>model fetched as|model updated by a delta "
                         r"of) (?P<chunks>\d+) chunks \((?P<bytes>\d+) bytes\): (?P<peers>\d+) bytes from peers, "
                         r"(?P<coordinator>\d+) from the coordinator")
MODEL_LINK = re.compile(STAMP + r" INFO \S+: round (?P<round>\d+): model fetched over the (?P<path>\w+) "
                        r"\((?P<bytes>\d+) bytes\)")
UPDATE_ACCEPTED = re.compile(r"^round (?P<round>\d+): update accepted \| .*? \| (?P<rate>[\d,]+) tok/s \| H=(?P<h>\d+)",
                             re.M)
PROBLEM = re.compile(r"^(?:\S+ \S+ )?(?P<level>WARNING|ERROR|CRITICAL) (?P<message>.*)$|^(?P<tb>Traceback .*)$", re.M)
HEX = re.compile(r"[0-9a-f]{12,}")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def local_epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# ---------------------------------------------------------------- what one configuration measured


@dataclass
class NodeRound:
    """How one node got one round's model, and how long it trained on it."""

    source: str  # "snapshot" or "delta" (blobs, from peers and the coordinator), or "link" (the old in-band path)
    model_bytes: int
    from_peers: int
    from_coordinator: int
    held_at: float  # when the node held the checked model (its log line), seconds since the epoch
    train_s: float | None = None  # tokens / the tokens per second it reported
    update_at: float | None = None  # when the coordinator accepted its update (the store's received_at)
    update_bytes: int = 0  # the encoded pseudo-gradient it uploaded to the coordinator

    @property
    def upload_s(self) -> float | None:
        """Model held -> update accepted, less training: the shard, encoding, and the update's upload."""
        if self.update_at is None or self.train_s is None:
            return None
        return self.update_at - self.held_at - self.train_s


@dataclass
class RoundMeasure:
    round: int  # as status counts rounds: round r's commit completes r rounds
    opened_at: float
    closed_at: float
    last_update_at: float  # the last update this round's commit took arrived (accepted) then
    accepted: int
    coordinator_bytes_out: int
    nodes: dict[str, NodeRound] = field(default_factory=dict)  # node id (first 12 hex digits) -> its round

    @property
    def fetch_s(self) -> float:
        """The slowest node's time from the round's opening to its model held."""
        return max(n.held_at for n in self.nodes.values()) - self.opened_at

    @property
    def train_s(self) -> float:
        """The slowest node's training seconds."""
        return max((n.train_s for n in self.nodes.values() if n.train_s is not None), default=0.0)

    @property
    def upload_s(self) -> float:
        """The slowest node's upload_s."""
        return max((n.upload_s for n in self.nodes.values() if n.upload_s is not None), default=0.0)

    @property
    def overhead_s(self) -> float:
        """From the round's opening to its last update's arrival, less the slowest node's training seconds."""
        return self.last_update_at - self.opened_at - self.train_s

    @property
    def wall_s(self) -> float:
        return self.closed_at - self.opened_at

    @property
    def close_s(self) -> float:
        """The coordinator's own close: judging, aggregation, outer step, delta, validation, checkpoint, commit."""
        return self.closed_at - self.last_update_at

    @property
    def delta_bytes(self) -> int:
        return max((n.model_bytes for n in self.nodes.values() if n.source == "delta"), default=0)

    def steady(self, n: int) -> bool:
        """Every one of the n nodes took part and updated its model by the delta (none joined late)."""
        return (self.round > 1 and self.accepted == n and len(self.nodes) == n
                and all(x.source == "delta" for x in self.nodes.values()))


@dataclass
class RunMeasure:
    n: int
    peers: int  # the tracker's --peers (0: the star)
    listen: bool = False  # trainers serve their blobs over HTTP (--listen) and fetch each other's there
    seconds: float = 0.0
    rounds: list[RoundMeasure] = field(default_factory=list)
    node_status: dict[str, dict] = field(default_factory=dict)  # node id -> its last /api/status entry while live
    paths: Counter = field(default_factory=Counter)  # how trainers reached the coordinator: webrtc, websocket
    problems: Counter = field(default_factory=Counter)  # warning and error lines, numbers and ids blanked
    note: str = ""  # why the run ended early, if it did
    min_available_gib: float = float("inf")

    @property
    def name(self) -> str:
        return "star" if self.peers == 0 else f"mesh({self.peers})" + ("+http" if self.listen else "")

    @property
    def first(self) -> RoundMeasure | None:
        return self.rounds[0] if self.rounds else None

    @property
    def steady(self) -> list[RoundMeasure]:
        return [r for r in self.rounds if r.steady(self.n)]

    def steady_mean(self, what) -> float | None:
        values = [what(r) for r in self.steady]
        return statistics.fmean(values) if values else None


@dataclass
class HivemindMeasure:
    peers: int
    values: int
    allreduce_s: list[float]
    matchmaking_s: list[float]
    error: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.allreduce_s) if self.allreduce_s else None


# ---------------------------------------------------------------- one configuration


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_swarm(n: int, peers: int, args: argparse.Namespace, listen: bool = False) -> RunMeasure:
    """A fresh coordinator and n trainers for args.rounds rounds (with `listen`, each serving its blobs over HTTP on a
    free loopback port); what they did, read from the coordinator's store, its status and the trainers' logs."""
    measure = RunMeasure(n, peers, listen)
    tag = f"  [N={n} {measure.name}]"
    suffix = "-listen" if listen else ""
    with tempfile.TemporaryDirectory(prefix=f"bench-dataplane-{n}-{peers}{suffix}-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.monotonic()
        coordinator = Coordinator(tmp, tmp / "data", "--model", args.model, "--inner-steps", "1", "--batch",
                                  str(args.batch), "--rounds", str(args.rounds), "--verify-share", "0", "--peers",
                                  str(peers), "--deadline-seconds", "600", "--codec", args.codec)
        trainers: list[Process] = []
        records, updates = [], []
        try:
            coordinator.wait_ready(COORDINATOR_READY_S)
            trainers = [Process(["-m", "server", "trainer", "--coordinator", coordinator.url,
                                 *(["--listen", "127.0.0.1:0"] if listen else [])],
                                tmp / f"trainer-{i}.log") for i in range(n)]
            progress(f"{tag} coordinator and {n} trainers started")
            committed, finished = 0, False
            while time.monotonic() - started < args.timeout:
                status = coordinator.status()
                for node in status["nodes"]:
                    if node["state"] != "offline":
                        measure.node_status[node["id"]] = node
                measure.min_available_gib = min(measure.min_available_gib, available_gib())
                for h in status["history"]:
                    if h["round"] > committed:
                        committed = h["round"]
                        progress(f"{tag} round {committed}/{args.rounds} committed at "
                                 f"{time.monotonic() - started:.0f} s: {h['accepted']} update(s), the coordinator "
                                 f"sent {h['coordinator_bytes_out'] / MB:.1f} MB")
                if status["state"] == "finished":
                    finished = True
                    break
                exited = [t for t in trainers if t.proc.poll() is not None]
                if exited:
                    measure.note = (f"{len(exited)} trainer(s) exited early (exit {exited[0].proc.returncode}); "
                                    f"the last lines of one:\n{exited[0].output()[-1500:]}")
                    break
                time.sleep(POLL_S)
            if not finished and not measure.note:
                measure.note = (f"timed out after {args.timeout:.0f} s with {committed} of {args.rounds} rounds "
                                "committed")
            store = Store(tmp / "data" / "state.db", read_only=True)
            try:
                records, updates = store.rounds(), store.updates()
            finally:
                store.close()
            if finished:
                for t in trainers:
                    try:
                        t.wait(TRAINER_EXIT_S)
                    except subprocess.TimeoutExpired:
                        measure.problems["a trainer was still running a minute after the job finished"] += 1
        except (AssertionError, OSError) as e:  # the coordinator did not start, or went away: report what there is
            measure.note = f"the run broke off: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        finally:
            for p in trainers:
                p.stop()
            coordinator.stop()
        measure.seconds = time.monotonic() - started
        logs = [t.output() for t in trainers]
        if args.logs is not None:
            kept = args.logs / f"N{n}-peers{peers}{suffix}"
            kept.mkdir(parents=True, exist_ok=True)
            for p in [coordinator, *trainers]:
                shutil.copy(p.log_path, kept / p.log_path.name)
        read_logs(measure, records, updates, logs, coordinator.output())
    if measure.note:
        progress(f"{tag} {measure.note.splitlines()[0]}")
    return measure


def read_logs(measure: RunMeasure, records, updates, trainer_logs: list[str], coordinator_log: str) -> None:
    """Fill measure.rounds from the store's round records and updates and the trainers' log lines."""
    by_node_round: dict[tuple[str, int], NodeRound] = {}
    rates: dict[tuple[str, int], float] = {}
    for log in trainer_logs:
        joined = JOINED.search(log)
        if joined is None:
            measure.problems["a trainer never joined"] += 1
            continue
        node = joined["node"]
        measure.paths[joined["path"]] += 1
        for m in MODEL_BLOBS.finditer(log):
            source = "snapshot" if m["what"] == "model fetched as" else "delta"
            by_node_round[node, int(m["round"])] = NodeRound(source, int(m["bytes"]), int(m["peers"]),
                                                             int(m["coordinator"]), local_epoch(m["at"]))
        for m in MODEL_LINK.finditer(log):
            by_node_round[node, int(m["round"])] = NodeRound("link", int(m["bytes"]), 0, int(m["bytes"]),
                                                             local_epoch(m["at"]))
            measure.problems[f"a model came over the {m['path']} (no blobs)"] += 1
        for m in UPDATE_ACCEPTED.finditer(log):
            rates[node, int(m["round"])] = float(m["rate"].replace(",", ""))
        count_problems(measure.problems, log)
    count_problems(measure.problems, coordinator_log)
    for u in updates:
        key = (u.node_id[:12], u.round + 1)  # an update's round is the assignment's, counted from 0
        if u.accepted and key in by_node_round and key in rates and rates[key] > 0:
            by_node_round[key].train_s = u.tokens / rates[key]
            by_node_round[key].update_at, by_node_round[key].update_bytes = u.received_at, u.bytes
    for record in records:
        if record.round == 0:
            continue  # the initial model, no round
        taken = [u for u in updates if u.accepted and u.committed_round == record.round]
        rnd = RoundMeasure(record.round, record.opened_at, record.closed_at,
                           max((u.received_at for u in taken), default=record.closed_at), record.accepted,
                           record.bytes_sent)
        rnd.nodes = {node: nr for (node, r), nr in by_node_round.items() if r == record.round}
        measure.rounds.append(rnd)


def count_problems(problems: Counter, log: str) -> None:
    for m in PROBLEM.finditer(log):
        text = m["tb"] or f"{m['level']} {m['message']}"
        problems[re.sub(r"\d+", "#", HEX.sub("…", text))[:160]] += 1


# ---------------------------------------------------------------- hivemind


def hivemind_venv_default() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "swarmgrad" / "bench-hivemind"


def hivemind_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import hivemind; print(hivemind.__version__)"], capture_output=True,
                          text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def install_hivemind(venv: Path) -> tuple[Path | None, str]:
    """hivemind in a venv of its own at `venv` (installed once, reused after): its python, or None and why not."""
    python = venv / "bin" / "python"
    if version := hivemind_version(python):
        return python, f"hivemind {version} (venv {venv})"
    # hivemind asks for any torch; left alone, pip picks a CUDA build of several GB. The project's own torch
    # release is pinned first (a CPU wheel where one lies on local disk).
    torch_release = importlib.metadata.version("torch").split("+")[0]
    progress(f"installing hivemind into {venv} (a venv of its own; torch=={torch_release} first) ...")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_release}"],
             [str(python), "-m", "pip", "install", "--quiet", "hivemind"]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"`{shlex.join(step[-3:])}` took over {PIP_TIMEOUT_S:.0f} s"
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            return None, f"`{shlex.join(step[-3:])}` failed (exit {done.returncode}): {tail}"
    if version := hivemind_version(python):
        return python, f"hivemind {version}, just installed (venv {venv})"
    return None, f"hivemind installed into {venv} but does not import"


def run_hivemind(python: Path, peers: int, values: int, repeat: int) -> HivemindMeasure:
    progress(f"  [N={peers} hivemind] all-reducing {values:,} float32 values among {peers} peers, {repeat} times")
    command = [str(python), str(HIVEMIND_SCRIPT), "--peers", str(peers), "--values", str(values), "--repeat",
               str(repeat)]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=HIVEMIND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return HivemindMeasure(peers, values, [], [], f"no result within {HIVEMIND_TIMEOUT_S:.0f} s")
    for line in done.stderr.splitlines():
        if line.startswith("    [hivemind]"):
            progress(line)
    if done.returncode != 0 or not done.stdout.strip():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return HivemindMeasure(peers, values, [], [], f"exit {done.returncode}: {tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return HivemindMeasure(peers, values, [r["allreduce_s"] for r in result["rounds"]],
                           [r["matchmaking_s"] for r in result["rounds"]])


# ---------------------------------------------------------------- the report


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"x{a / b:.2f}"


def per_node(run: RunMeasure, rounds: list[RoundMeasure], what) -> float | None:
    """The mean over the given rounds and their nodes of what(NodeRound)."""
    values = [what(n) for r in rounds for n in r.nodes.values()]
    return statistics.fmean(values) if values else None


COLUMNS = (f"{'N':>2} {'layout':<12} {'coord MB':>8} {'coord MB':>8} {'x delta':>7} {'node MB/round':>15} "
           f"{'fetch s':>7} {'train s':>7} {'upload s':>8} {'overhead s':>10} {'wall s':>7} {'close s':>7}  steady")
COLUMNS2 = (f"{'':>2} {'':<12} {'round 1':>8} {'/round':>8} {'':>7} {'peers + coord':>15} "
            f"{'':>7} {'':>7} {'':>8} {'':>10} {'':>7} {'':>7}  rounds")


def row(run: RunMeasure) -> str:
    steady = run.steady
    first = run.first
    x_delta = run.steady_mean(lambda r: r.coordinator_bytes_out / r.delta_bytes if r.delta_bytes else 0.0)
    node_mb = (f"{fmt(per_node(run, steady, lambda x: x.from_peers), MB, 2)} + "
               f"{fmt(per_node(run, steady, lambda x: x.from_coordinator), MB, 2)}")
    return (f"{run.n:>2} {run.name:<12} {fmt(first and first.coordinator_bytes_out, MB):>8} "
            f"{fmt(run.steady_mean(lambda r: r.coordinator_bytes_out), MB):>8} {fmt(x_delta, 1, 2):>7} "
            f"{node_mb:>15} {fmt(run.steady_mean(lambda r: r.fetch_s), 1, 2):>7} "
            f"{fmt(run.steady_mean(lambda r: r.train_s), 1, 2):>7} {fmt(run.steady_mean(lambda r: r.upload_s)):>8} "
            f"{fmt(run.steady_mean(lambda r: r.overhead_s)):>10} "
            f"{fmt(run.steady_mean(lambda r: r.wall_s)):>7} {fmt(run.steady_mean(lambda r: r.close_s)):>7}  "
            f"{','.join(str(r.round) for r in steady) or 'none'}")


def ratio_row(star: RunMeasure, mesh: RunMeasure, label: str = "mesh/star") -> str:
    def both(what):
        return mesh.steady_mean(what), star.steady_mean(what)

    first = ratio(mesh.first and mesh.first.coordinator_bytes_out, star.first and star.first.coordinator_bytes_out)
    return (f"{'':>2} {label:<12} {first:>8} {ratio(*both(lambda r: r.coordinator_bytes_out)):>8} {'':>7} "
            f"{'':>15} {ratio(*both(lambda r: r.fetch_s)):>7} {'':>7} {ratio(*both(lambda r: r.upload_s)):>8} "
            f"{ratio(*both(lambda r: r.overhead_s)):>10} {ratio(*both(lambda r: r.wall_s)):>7}")


def node_lines(run: RunMeasure) -> list[str]:
    """One line per node: its first round, its steady rounds, and its cumulative counts as /api/status showed them."""
    lines = []
    first, steady = run.first, run.steady
    for node in sorted({k for r in run.rounds for k in r.nodes}):
        st = next((s for node_id, s in run.node_status.items() if node_id.startswith(node)), None)
        f = first.nodes.get(node) if first else None
        first_text = (f"round 1 {f.source} {f.from_peers / MB:.1f} + {f.from_coordinator / MB:.1f} MB"
                      if f else "not in round 1")
        mine = [r.nodes[node] for r in steady if node in r.nodes]
        steady_text = (f"steady {statistics.fmean(x.from_peers for x in mine) / MB:.2f} + "
                       f"{statistics.fmean(x.from_coordinator for x in mine) / MB:.2f} MB/round" if mine else "")
        status_text = (f"status: {st['peers']} peer links, {st['bytes_from_peers'] / MB:.1f} MB from peers, "
                       f"{st['bytes_from_coordinator'] / MB:.1f} MB from the coordinator" if st else "not in status")
        lines.append(f"      {node[:8]}  {first_text:<34} {steady_text:<30} {status_text}")
    return lines


def report(runs: list[RunMeasure], hivemind: dict[int, HivemindMeasure], hivemind_note: str,
           args: argparse.Namespace, values: int, started: float) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print()
    print(f"data plane, {datetime.now():%Y-%m-%d}, {cpu} x{os.cpu_count()}, "
          f"{available_total_gib():.0f} GiB; model {args.model} "
          f"({values:,} parameters, {values * 4 / MB:.1f} MB fp32), --inner-steps 1 --batch {args.batch} "
          f"--rounds {args.rounds}, --codec {args.codec} pseudo-gradients, int8 deltas")
    print("  coord MB: what the coordinator sent while the round was open (history[].coordinator_bytes_out); "
          "round 1 is the snapshot,")
    print("    /round its mean over the steady rounds (rounds after the first in which all N nodes took the delta); "
          "x delta: that per round over the round's delta size")
    print("  node MB/round: mean per node and steady round, from peers + from the coordinator (trainers' log lines)")
    print("  fetch s: round opened -> the slowest node holds the checked model; train s: the slowest node's training "
          "seconds (tokens / its tok/s)")
    print("  upload s: the slowest node's model held -> its update accepted, less its training (shard, encoding, the "
          "update's upload)")
    print("  overhead s: round opened -> its last update arrived at the coordinator, minus train s (the model fetch, "
          "shard, encoding, the upload, waiting)")
    print("  wall s: round opened -> committed; close s: last update -> committed (aggregation, validation, "
          "checkpoint: no data plane)")
    print(COLUMNS)
    print(COLUMNS2)
    by_n: dict[int, dict[tuple[int, bool], RunMeasure]] = {}
    for run in runs:
        by_n.setdefault(run.n, {})[run.peers, run.listen] = run
    star_key, mesh_key, http_key = (0, False), (args.mesh_peers, False), (args.mesh_peers, True)
    for n, pair in by_n.items():
        for run in pair.values():
            print(row(run))
        if star_key in pair and mesh_key in pair:
            print(ratio_row(pair[star_key], pair[mesh_key]))
        if mesh_key in pair and http_key in pair:
            print(ratio_row(pair[mesh_key], pair[http_key], "http/mesh"))
        h = hivemind.get(n)
        if h is not None and h.median_s is not None:
            mesh = pair.get(mesh_key)
            overhead = mesh.steady_mean(lambda r: r.overhead_s) if mesh else None
            print(f"{n:>2} hivemind  DecentralizedAverager all-reduce of {values * 4 / MB:.1f} MB fp32 among {n}: "
                  f"median {h.median_s:.2f} s of {', '.join(f'{s:.2f}' for s in h.allreduce_s)} "
                  f"(+ matchmaking {statistics.median(h.matchmaking_s):.2f} s); mesh overhead / all-reduce "
                  f"{ratio(overhead, h.median_s)}")
        elif h is not None:
            print(f"{n:>2} hivemind  failed: {h.error}")
    if hivemind_note:
        print(f"  hivemind: {hivemind_note}")
    print()
    print("per node (id; round 1's model: from peers + from the coordinator; steady rounds; /api/status at the end "
          "of the run, while the node was live):")
    for run in runs:
        paths = ", ".join(f"{k} {v}" for k, v in run.paths.items())
        snapshots = run.first.coordinator_bytes_out / (values * 4) if run.first else 0.0
        print(f"  N={run.n} {run.name}: {run.seconds:.0f} s, {len(run.rounds)} rounds committed, trainers over "
              f"{paths or 'nothing'}, memory available at least {run.min_available_gib:.1f} GiB; in round 1 the "
              f"coordinator sent x{snapshots:.2f} the fp32 snapshot")
        if run.note:
            print(f"    ended early: {run.note.splitlines()[0]}")
        for line in node_lines(run):
            print(line)
        for text, count in run.problems.most_common(8):
            print(f"    log: {count} x {text}")
        if not run.problems:
            print("    logs: no warning, error or traceback in the coordinator's or any trainer's log")
    goals(runs, hivemind, args, values)
    print(f"\nthe whole bench took {(time.monotonic() - started) / 60:.1f} min")


def available_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def goals(runs: list[RunMeasure], hivemind: dict[int, HivemindMeasure], args: argparse.Namespace,
          values: int) -> None:
    """Issue 11's goals, stated against what this run measured."""
    print("\ngoals:")
    meshes = [r for r in runs if r.peers == args.mesh_peers and not r.listen and r.steady]
    if not meshes:
        print("  no mesh run has a steady round; nothing to judge")
        return
    big = max(meshes, key=lambda r: r.n)
    x_delta = big.steady_mean(lambda r: r.coordinator_bytes_out / r.delta_bytes if r.delta_bytes else 0.0)
    verdict = "met" if x_delta is not None and x_delta <= GOAL_DELTAS_PER_ROUND else "NOT met"
    print(f"  coordinator egress per steady round at N={big.n} (mesh): "
          f"{big.steady_mean(lambda r: r.coordinator_bytes_out) / MB:.2f} MB = x{x_delta:.2f} the round's delta "
          f"(goal: at most x{GOAL_DELTAS_PER_ROUND:g}): {verdict}")
    down = per_node(big, big.steady, lambda x: x.from_peers + x.from_coordinator)
    peer_up = per_node(big, big.steady, lambda x: x.from_peers)  # every byte a node got from a peer, a peer sent
    print(f"  download vs upload at N={big.n} (mesh), per node and steady round: download {down / MB:.2f} MB (the "
          f"delta); upload to peers is not in /api/status per node, but across the swarm what peers sent is what "
          f"peers received, so the mean node uploaded {peer_up / MB:.2f} MB to peers (x{peer_up / down:.2f} its "
          f"download), plus its {per_node(big, big.steady, lambda x: x.update_bytes) / MB:.1f} MB "
          f"{args.codec} pseudo-gradient to the coordinator")
    for run in [r for r in runs if r.peers == args.mesh_peers and r.steady]:
        h = hivemind.get(run.n)
        overhead = run.steady_mean(lambda r: r.overhead_s)
        if h is not None and h.median_s is not None:
            print(f"  round overhead at N={run.n}, {run.name}: {overhead:.1f} s against hivemind's "
                  f"all-reduce of the same values {h.median_s:.2f} s: x{overhead / h.median_s:.1f}")
        else:
            print(f"  round overhead at N={run.n}, {run.name}: {overhead:.1f} s (no hivemind result)")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_dataplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="2,4,8", help="numbers of trainers, comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per configuration; the first is the snapshot "
                                                         "(default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step; the default rules' minimum is 4 "
                                                        "(default: %(default)s)")
    p.add_argument("--model", default="base", help="model size (default: %(default)s)")
    p.add_argument("--codec", default="fp32", help="how pseudo-gradients travel; fp32 matches what hivemind "
                                                   "all-reduces (default: %(default)s)")
    p.add_argument("--mesh-peers", type=int, default=4, help="the mesh's --peers K (default: %(default)s)")
    p.add_argument("--listen", action="store_true", help="also run the mesh with every trainer serving its blobs "
                   "over HTTP (trainer --listen 127.0.0.1:0), so that peers fetch them there")
    p.add_argument("--no-star", action="store_true", help="skip the star (--peers 0)")
    p.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S,
                   help="seconds one configuration may take; then the bench reports what it got (default: %(default)s)")
    p.add_argument("--logs", type=Path, help="keep the coordinator's and trainers' logs under this folder")
    p.add_argument("--no-hivemind", action="store_true", help="skip hivemind's all-reduce")
    p.add_argument("--hivemind-repeat", type=int, default=HIVEMIND_REPEAT,
                   help="all-reduces per N, reported as the median (default: %(default)s)")
    p.add_argument("--hivemind-venv", type=Path, default=hivemind_venv_default(),
                   help="hivemind's own venv, created and installed once (default: %(default)s)")
    # set by the bench itself when it runs itself again inside the namespace
    p.add_argument("--hivemind-python", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hivemind-unavailable", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.node_counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--nodes takes numbers separated by commas, like 2,4,8; got {args.nodes!r}")
    if not args.node_counts or min(args.node_counts) < 2:
        p.error("--nodes needs numbers of at least 2")
    if args.rounds < 2:
        p.error("--rounds must be at least 2: the first round fetches the snapshot, the steady state starts after")
    if args.mesh_peers < 1:
        p.error("--mesh-peers must be at least 1 (0 is the star, which the bench runs unless --no-star)")
    return args


def enter_namespace(argv: list[str], args: argparse.Namespace) -> int:
    """Install hivemind while the network is there, then run this bench again in a loopback-only namespace."""
    extra: list[str] = []
    if not args.no_hivemind and args.hivemind_python is None:
        python, note = install_hivemind(args.hivemind_venv)
        extra = ["--hivemind-python", str(python)] if python else ["--hivemind-unavailable", note]
        progress(f"hivemind: {note}")
    command = [sys.executable, "-m", "bench.bench_dataplane", *argv, *extra]
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("this bench starts WebRTC peers and must run in a loopback-only network namespace, which needs root "
              "and unshare(1). Run it as root, or yourself:\n  unshare -n sh -c 'ip link set lo up && exec "
              f"{shlex.join(command)}'", file=sys.stderr)
        return 2
    progress("running in a loopback-only network namespace (unshare -n; lo up)")
    return subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command],
                          cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not only_loopback_interfaces():
        return enter_namespace(argv, args)
    started = time.monotonic()
    values = num_parameters(model_config(args.model))
    hivemind_python, hivemind_note = None, ""
    if args.no_hivemind:
        hivemind_note = "skipped (--no-hivemind)"
    elif args.hivemind_python is not None:
        hivemind_python = args.hivemind_python
    elif args.hivemind_unavailable:
        hivemind_note = f"not installed, so not measured: {args.hivemind_unavailable}"
    elif hivemind_version(args.hivemind_venv / "bin" / "python"):
        hivemind_python = args.hivemind_venv / "bin" / "python"
    else:
        hivemind_note = (f"not installed in {args.hivemind_venv}, and this namespace has no network to install it: "
                         "run the bench from outside a namespace once, and it installs hivemind first")
    if hivemind_note:
        progress(f"hivemind: {hivemind_note}")
    runs: list[RunMeasure] = []
    hivemind: dict[int, HivemindMeasure] = {}
    for n in args.node_counts:
        layouts = [(0, False)] * (not args.no_star) + [(args.mesh_peers, False)] + [(args.mesh_peers, True)] * args.listen
        for peers, listen in layouts:
            runs.append(run_swarm(n, peers, args, listen))
        if hivemind_python is not None:
            hivemind[n] = run_hivemind(hivemind_python, n, values, args.hivemind_repeat)
    report(runs, hivemind, hivemind_note, args, values, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
