"""Hostile traffic against a live coordinator: fuzzed frames per second, crashes, memory drift and log bytes.

It must never contact an address other than 127.0.0.1, and refuses to run outside a loopback-only network namespace.

usage: unshare -n sh -c 'ip link set lo up && python -m bench.bench_fuzz [--frames 1000000] [--after-hello 0.2]
       [--concurrency 16] [--seed 0]'

It starts `python -m server` itself (a fresh data directory, the default rulebook with the join-rate cap lifted as
the simulator lifts it, and members that joined once before the clock starts). Every frame travels on a fresh
signaling connection, because a bad frame costs its connection: challenge, then (for an `--after-hello` share of
frames) a proper hello as one of the members, then the fuzzed frame, which must get a typed fatal Error whose code
is what shared.wire's own decoder says, and a 1008 close. The baseline, measured in the same run, is the bare
connection: challenge, then a clean close. Frames are drawn from a seeded generator, the same for a given seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import websockets

from server.keys import NodeKey
from shared import wire
from shared.identity import signing_bytes
from shared.wire import Error, Hello, Welcome, WireError, decode_message
from server.coordinator.intake import JOINS_PER_KEY_PER_MINUTE
from server.net.signaling import CLOSE_POLICY
from tests.conftest import Coordinator, only_loopback_interfaces

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 120.0
REPLY_TIMEOUT_S = 30.0  # one connection's exchange; a coordinator this slow to answer is stuck
JOINS_PER_MEMBER = JOINS_PER_KEY_PER_MINUTE - 5  # below the coordinator's per-key limit, however fast the run goes


class NotLoopbackError(RuntimeError):
    """This process can reach an interface other than lo; the bench refuses to run."""


# ---------------------------------------------------------------- hostile frames

TEMPLATES = [
    Hello("a" * 64, "trainer", "b" * 64, "c" * 128, "fuzz"),
    wire.Update("a" * 64, 0, "b" * 64, 1000, 10, 3.0, 2.5, {"name": "fp32", "params": {}}, 100, 1, "c" * 64, 400,
                "d" * 128),
    wire.RoundOpen(1, "a" * 64, "b" * 128, {"inner_steps": 2}, 0, 1.0),
    wire.PayloadHeader(7, "update", 10, 1, "d" * 64, {"round": 1}),
    wire.ModelRequest(0, "a" * 64),
    wire.Sdp("a" * 64, "b" * 64, "offer", "v=0"),
    wire.PathSelect("websocket"),
    wire.Error("bad_field", "what", True),
    wire.Bye(),
]
ODD_STRINGS = ["", "\ud800", "x\udfff", "\U0001f600", "\x00", "a" * 5000, "[{", '"', "\\"]
ODD_VERSIONS = [True, 1.0, "1", 2, 0, None, [1], {"v": 1}, 1e300]


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**53, 2**53 + 1, -(2**64), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf"), rng.random()])
    if kind == 4:
        return rng.choice(ODD_STRINGS)
    if kind == 5:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ODD_STRINGS[:5] + ["v", "type", "x"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def bent_message(rng: random.Random) -> str:
    d = rng.choice(TEMPLATES).to_dict()
    for _ in range(rng.randrange(1, 4)):
        how = rng.randrange(6)
        name = rng.choice(list(d))
        if how == 0:
            d[name] = random_value(rng)
        elif how == 1:
            del d[name]
        elif how == 2:
            d[rng.choice(["extra", "V", "Type", ""])] = random_value(rng)
        elif how == 3:
            d["v"] = rng.choice(ODD_VERSIONS)
        elif how == 4:
            d["type"] = rng.choice([[d.get("type")], {"hello": 1}, "nope", None, 7, "HELLO"])
        else:
            d[name] = rng.choice(ODD_STRINGS[1:3])  # a lone surrogate, written as JSON's \ud800 escape
    text = json.dumps(d)
    if rng.random() < 0.2:  # cut short, or with a stray character
        cut = rng.randrange(len(text))
        text = text[:cut] if rng.random() < 0.5 else text[:cut] + rng.choice('{}[]",:\\') + text[cut:]
    return text


MAX_FUZZ_FRAME = 100_000  # past MAX_CONTROL_BYTES, to reach that check too, and far below the WebSocket's own limit


def deep_frame(rng: random.Random) -> str:
    opener = rng.choice(["[", '{"a":', '["\\"]",'])
    most = MAX_FUZZ_FRAME // (len(opener) + 1)
    depth = int(math.exp(rng.uniform(math.log(wire.MAX_JSON_DEPTH), math.log(most))))  # log-uniform
    return opener * depth + rng.choice(["", "1", "]" * depth])


def binary_frame(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(65))
    return wire.CHUNK_HEADER.pack(wire.CHUNK_MAGIC, rng.randrange(2**32), rng.randrange(2**32)) + rng.randbytes(
        rng.randrange(40))


def fuzz_frame(rng: random.Random) -> str | bytes:
    kind = rng.random()
    if kind < 0.55:
        return bent_message(rng)
    if kind < 0.70:
        return json.dumps(random_value(rng))
    if kind < 0.80:
        return binary_frame(rng)
    if kind < 0.90:
        return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(40)))
    return deep_frame(rng)


def expected_code(frame: str | bytes, after_hello: bool) -> str | None:
    """The Error code a coordinator must answer `frame` with, by shared.wire's own decoder (the one definition;
    tests/integration/test_hostile_input.py holds the coordinator to it too); None for a frame that happens to be
    a valid message after hello, which the coordinator may rightly answer with nothing."""
    if not after_hello:
        if not isinstance(frame, str):
            return "malformed"
        try:
            msg = decode_message(frame)
        except WireError as e:
            return e.code
        return "auth" if isinstance(msg, Hello) else "protocol"  # no fuzzed hello signs the live challenge
    try:
        wire.FrameReceiver(wire.MAX_PAYLOAD_BYTES).feed(frame)
    except WireError as e:
        return e.code
    return None


# ---------------------------------------------------------------- the coordinator and the clients


def require_loopback_namespace() -> None:
    if not only_loopback_interfaces():
        raise NotLoopbackError("this process sees network interfaces other than lo; run the bench in a "
                               "loopback-only namespace: unshare -n sh -c 'ip link set lo up && python -m "
                               "bench.bench_fuzz'")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (/proc/PID/stat), whatever the client side costs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def start_coordinator(workdir: Path) -> Coordinator:
    """A coordinator process on 127.0.0.1 with a fresh data directory and the join-rate cap lifted (tests.conftest's
    process, so that bench and tests start, watch and stop it one way)."""
    from server.sim import simulation_rules  # here, not at the top: it imports torch, nothing else does

    rules = workdir / "rules.toml"
    rules.write_text(simulation_rules())
    return Coordinator(workdir, workdir / "data", "--deadline-seconds", "3600", "--rules", str(rules))


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # typed, wrong_code, close_<code>, busy, joined, ...
    codes: Counter = field(default_factory=Counter)  # the Error codes of the typed refusals
    examples: list = field(default_factory=list)  # the first few frames that did not get what they should


def signed_hello(key: NodeKey, nonce: str) -> str:
    hello = Hello(key.node_id, "trainer", nonce, "0" * 128, "bench_fuzz member")
    return Hello(**{**hello.__dict__, "signature": key.sign(signing_bytes("hello", hello.signing_fields()))}).encode()


def verdict(reply: object, close_code: int, code: str | None) -> str:
    if reply is None:
        return f"close_{close_code}_without_error"
    if not (isinstance(reply, Error) and reply.fatal and close_code == CLOSE_POLICY):
        return f"close_{close_code}_after_{type(reply).__name__}"
    return "typed" if reply.code == code else "wrong_code"


async def one_connection(url: str, frame: str | bytes | None, member: NodeKey | None, code: str | None,
                         tally: Tally) -> None:
    """Challenge, a hello as `member` (if any), then `frame` and the verdict on its answer; without a frame, a
    clean close after the challenge (or after the Welcome)."""
    async with websockets.connect(url, max_size=1 << 20, compression=None, open_timeout=REPLY_TIMEOUT_S) as ws:
        challenge = decode_message(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S))
        if member is not None:
            await ws.send(signed_hello(member, challenge.nonce))
            welcome = decode_message(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S))
            if not isinstance(welcome, Welcome):
                tally.outcomes["busy" if isinstance(welcome, Error) and welcome.code == "busy" else "no_welcome"] += 1
                return
        if frame is None:
            tally.outcomes["joined" if member is not None else "clean"] += 1
            return
        await ws.send(frame)
        reply = None
        try:
            reply = decode_message(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S))
            await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S)
            outcome = "no_close"
        except websockets.exceptions.ConnectionClosed as closed:
            outcome = verdict(reply, closed.rcvd.code if closed.rcvd is not None else 1006, code)
        tally.outcomes[outcome] += 1
        if outcome == "typed":
            tally.codes[code] += 1
        elif len(tally.examples) < 5:
            tally.examples.append((outcome, code, reply, frame[:120]))


class MemberPool:
    """Members for hellos: never one key on two connections at once (the second would replace the first), and
    never one key more than JOINS_PER_MEMBER times in all (the coordinator refuses a key's joins past JOINS_PER_KEY_PER_MINUTE)."""

    def __init__(self, keys: list[NodeKey]):
        self.free = deque(keys)
        self.uses: Counter = Counter()

    def take(self) -> NodeKey:
        if not self.free:
            raise RuntimeError("no member left: the bench made too few (see members_needed)")
        return self.free.popleft()

    def give_back(self, key: NodeKey) -> None:
        self.uses[key.node_id] += 1
        if self.uses[key.node_id] < JOINS_PER_MEMBER:
            self.free.append(key)


def members_needed(hellos: int, concurrency: int) -> int:
    """Enough keys that MemberPool never runs dry: those used up, plus one for every connection in flight."""
    return -(-hellos // JOINS_PER_MEMBER) + concurrency


async def drive(url: str, connections, concurrency: int, tally: Tally, coordinator: Coordinator,
                members: MemberPool | None = None) -> float:
    """Run `connections` (an iterable of (frame, member, code); member True means one from `members`),
    `concurrency` at a time, until they run out or the coordinator dies; returns the seconds taken."""
    ws_url = url.replace("http", "ws") + "/ws"
    queue = iter(connections)

    async def worker() -> None:
        for frame, member, code in queue:  # one shared iterator: each connection is taken once
            if coordinator.proc.poll() is not None:
                return
            key = members.take() if member is True else member
            try:
                await one_connection(ws_url, frame, key, code, tally)
            except (OSError, asyncio.TimeoutError, WireError, websockets.exceptions.WebSocketException) as e:
                tally.outcomes[f"client_error_{type(e).__name__}"] += 1
            finally:
                if member is True:
                    members.give_back(key)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


# ---------------------------------------------------------------- main


def fuzz_connections(frames: int, seed: int, share: float):
    """The fuzz phase: frame i goes after a member's hello when i * share crosses an integer, so that exactly
    int(frames * share) do."""
    for i in range(frames):
        after_hello = int((i + 1) * share) > int(i * share)
        frame, code = frame_number(seed, i, after_hello)
        yield frame, after_hello or None, code


def frame_number(seed: int, i: int, after_hello: bool) -> tuple[str | bytes, str]:
    """Frame i of the run and the Error code it must get, the same for a given seed and i. Draws again while a
    frame happens to be a valid message after hello (the coordinator may rightly not answer one)."""
    rng = random.Random(f"{seed}:{i}")
    while True:
        frame = fuzz_frame(rng)
        code = expected_code(frame, after_hello)
        if code is not None:
            return frame, code


LOG_KINDS = {  # what a line of the coordinator's log is, by a marker in it
    "refusals": "closing the signaling socket",
    "held-back summaries": "suppressed ",
    "joined/left": "swarmgrad.signaling: node ",
    "tracebacks": "Traceback",
}


def log_breakdown(text: str) -> dict[str, list[int]]:
    """[lines, bytes] per kind of line ("other" for the rest)."""
    kinds: dict[str, list[int]] = {kind: [0, 0] for kind in [*LOG_KINDS, "other"]}
    for line in text.splitlines(keepends=True):
        kind = next((k for k, marker in LOG_KINDS.items() if marker in line), "other")
        kinds[kind][0] += 1
        kinds[kind][1] += len(line.encode())
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="fuzzed frames, one connection each")
    parser.add_argument("--after-hello", type=float, default=0.2, help="share of frames sent after a proper hello")
    parser.add_argument("--baseline", type=int, default=5_000, help="bare connections for the baseline")
    parser.add_argument("--concurrency", type=int, default=16, help="connections open at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.frames <= 0 or not 0 <= args.after_hello <= 1 or args.concurrency <= 0 or args.baseline <= 0:
        parser.error("--frames, --baseline and --concurrency must be positive, --after-hello in [0, 1]")
    require_loopback_namespace()

    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        coordinator = start_coordinator(Path(tmp))
        try:
            coordinator.wait_ready(READY_TIMEOUT_S)
            return asyncio.run(measure(args, coordinator))
        finally:
            coordinator.stop()


async def measure(args, coordinator: Coordinator) -> int:
    pid = coordinator.proc.pid
    members = [NodeKey() for _ in range(members_needed(int(args.frames * args.after_hello), args.concurrency))]
    warmup = Tally()  # every member's first join grants and stakes: before the clock starts
    await drive(coordinator.url, [(None, m, None) for m in members], args.concurrency, warmup, coordinator)
    baseline = Tally()
    cpu_start = cpu_seconds(pid)
    baseline_s = await drive(coordinator.url, [(None, None, None)] * args.baseline, args.concurrency, baseline,
                             coordinator)
    baseline_cpu = cpu_seconds(pid) - cpu_start

    rss_before, log_before, cpu_start = rss_kib(pid), coordinator.log_path.stat().st_size, cpu_seconds(pid)
    fuzz = Tally()
    fuzz_s = await drive(coordinator.url, fuzz_connections(args.frames, args.seed, args.after_hello),
                         args.concurrency, fuzz, coordinator, MemberPool(members))
    alive = coordinator.proc.poll() is None
    rss_after = rss_kib(pid) if alive else 0
    fuzz_cpu = cpu_seconds(pid) - cpu_start if alive else float("nan")
    fuzz_log = coordinator.output().encode()[log_before:].decode(errors="replace")
    log = log_breakdown(fuzz_log)
    log_bytes = sum(b for _, b in log.values())

    sent = sum(fuzz.outcomes.values())
    print(f"{args.frames} fuzzed frames ({args.after_hello:.0%} after a hello, {len(members)} members), "
          f"{args.concurrency} connections at once, on {LOOPBACK}, one connection per frame, seed {args.seed}")
    print(f"  warm-up: {dict(warmup.outcomes)}")
    print(f"  baseline, bare connections:  {args.baseline / baseline_s:8.1f} /s  ({dict(baseline.outcomes)})")
    print(f"  fuzzed frames:               {sent / fuzz_s:8.1f} /s  ({sent} in {fuzz_s:.1f} s)")
    print(f"  ratio fuzzed frames / bare connections: {sent / fuzz_s / (args.baseline / baseline_s):.3f}")
    print(f"  coordinator CPU: {fuzz_cpu / max(sent, 1) * 1e3:.2f} ms per fuzzed frame, "
          f"{baseline_cpu / args.baseline * 1e3:.2f} ms per bare connection: "
          f"ratio {fuzz_cpu / max(sent, 1) / (baseline_cpu / args.baseline):.2f}")
    print(f"  outcomes: {dict(fuzz.outcomes)}")
    print(f"  typed Error codes: {dict(sorted(fuzz.codes.items()))}")
    for example in fuzz.examples:
        print(f"    not as expected: {example}")
    state = "alive" if alive else f"exited with {coordinator.proc.returncode}"
    print(f"  crashes: {0 if alive else 1} (the coordinator is {state})")
    print(f"  coordinator RSS: {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB "
          f"(drift {(rss_after - rss_before) / 1024:+.1f} MiB)")
    print(f"  log: {log_bytes} bytes in the fuzz phase, {log_bytes / max(sent, 1):.2f} bytes per frame "
          f"(lines, bytes: {', '.join(f'{k} {n}, {b}' for k, (n, b) in log.items())})")
    refusals, refusal_bytes = log["refusals"]
    if refusals:  # the baseline: one refusal line for every frame, as the log had it before the limiter
        unlimited = refusal_bytes / refusals * sent
        limited = refusal_bytes + log["held-back summaries"][1]
        print(f"  refusal lines: {limited / max(sent, 1):.2f} bytes per frame, against {unlimited / max(sent, 1):.1f} "
              f"for one line each: ratio {limited / unlimited:.4f}")
    ok = alive and fuzz.outcomes["typed"] == sent == args.frames
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
