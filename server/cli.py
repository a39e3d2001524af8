"""The command line: `python -m server [serve options]`, `... trainer`, `... status`.

Each command parses its options and hands off to the module that does the work. Never put round logic here.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from server.options import (CODEC_HELP, codec_option, display_name_option, ice_server_url, int_at_least, listen_option,
                            model_option, share_option, tokenizer_option)

COMMANDS = ("serve", "trainer", "status", "ledger", "governance", "simulate", "export", "sample")
TURN_PASSWORD_ENV = "SWARMGRAD_TURN_PASSWORD"


def serve_parser() -> argparse.ArgumentParser:
    from server.coordinator import JobConfig
    from shared import aggregate
    from shared.model import MODEL_SIZES

    from server.coordinator.tracker import DEFAULT_PEERS

    d = JobConfig()
    p = argparse.ArgumentParser(prog="python -m server", description=(
        "Run a swarmgrad coordinator: it serves the contributor page, signals WebRTC peers, runs DiLoCo rounds "
        "and keeps state in SQLite (or PostgreSQL, --store). Other commands (each has --help): trainer, status, "
        "ledger verify|balances, governance list|propose|vote, simulate, export, sample."))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"),
                   help="state.db and checkpoints live here; a restart resumes from it (default: %(default)s)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="keep the coordinator's state (job, rounds, updates, nodes, ledger, governance) in this "
                        "PostgreSQL database, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, instead of "
                        "DATA_DIR/state.db; checkpoints and the coordinator's key stay in --data-dir "
                        "(default: SQLite)")
    p.add_argument("--model", default=d.model, type=model_option, metavar="SIZE",
                   help=f"model size: {', '.join(MODEL_SIZES)}, or n_layer=N,n_head=N,n_embd=N,block_size=N "
                        "(default: %(default)s)")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps,
                   help="local AdamW steps per round, H (default: %(default)s)")
    p.add_argument("--rounds", type=int_at_least(0), default=d.rounds,
                   help="stop after this many rounds; 0 = forever (default: %(default)s)")
    p.add_argument("--deadline-seconds", "--round-deadline", dest="deadline_seconds", type=float,
                   default=d.deadline_seconds, help="seconds a round waits for updates (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="inner AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=d.batch,
                   help="sequences per inner step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial parameters (default: %(default)s)")
    p.add_argument("--codec", default=d.codec, type=codec_option, metavar="CODEC",
                   help=CODEC_HELP + "; fixed for the job's life (default: %(default)s)")
    p.add_argument("--delta-codec", default=d.delta_codec, type=codec_option, metavar="CODEC",
                   help="how each round's model change travels to nodes, with error feedback so that nothing is "
                        "lost for good; every node applies the same bytes and checks the signed hash (fp32 sends "
                        "the exact change); fixed for the job's life (default: %(default)s)")
    p.add_argument("--peers", type=int_at_least(0), default=DEFAULT_PEERS, metavar="K",
                   help="peer links the coordinator (as tracker) advises each node to open: nodes fetch model chunks "
                        "from each other first and the coordinator seeds each chunk about once; 0 = a star, every "
                        "node fetches everything from the coordinator (default: %(default)s)")
    p.add_argument("--overlap", action="store_true",
                   help="overlapped rounds: nodes train round r+1 on the model before round r's aggregate, starting "
                        "as soon as they sent round r's update, so that no node waits for a round to close; each "
                        "aggregate steps the model one round later. A governed parameter: this seeds a new job, "
                        "votes change it (default: off)")
    p.add_argument("--aggregator", default=d.aggregator, choices=list(aggregate.RULES),
                   help="how the coordinator combines updates; governed, so votes may change it "
                        "(default: %(default)s)")
    p.add_argument("--verify-share", type=share_option, default=d.verify_share, metavar="SHARE",
                   help="the share of updates the coordinator re-executes to check the work was done, 0 to 1; "
                        "the updates of nodes without reputation are checked first, as verified work earns the "
                        "start grant and voting weight; 0 turns checks off and trusts accepted work "
                        "(default: %(default)s)")
    p.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="restrict WebRTC (ICE) to this local address; repeatable. Default: the --host address "
                        "when it is a loopback address, else every interface")
    p.add_argument("--ice-server", action="append", default=[], type=ice_server_url, metavar="URL",
                   help="a STUN or TURN server for every peer connection, the coordinator's and its nodes' (sent "
                        "to each node with the job); repeatable: stun:HOST[:PORT], turn:HOST[:PORT]"
                        "[?transport=udp|tcp] or turns:HOST[:PORT][?transport=tcp]. TURN URLs take their "
                        "credentials from --turn-username and --turn-password. Default: none (no server is ever "
                        "added implicitly)")
    p.add_argument("--turn-username", default=None, metavar="USER",
                   help="the username for every turn:/turns: --ice-server (required with one)")
    p.add_argument("--turn-password", default=None, metavar="PASSWORD",
                   help=f"the password for every turn:/turns: --ice-server (required with one; default: the "
                        f"{TURN_PASSWORD_ENV} environment variable, which keeps it out of the process list). Every "
                        "node receives these credentials, and /api/status never shows them")
    p.add_argument("--data", type=Path, default=None,
                   help="your own text corpus: a file, or a directory of .txt/.md/.py/.rst files "
                        "(default: the Python standard library's source)")
    p.add_argument("--tokenizer", default=d.tokenizer, type=tokenizer_option, metavar="bytes|bpe:VOCAB",
                   help="what a token is: bytes (vocabulary 256), or bpe:VOCAB, a byte-level BPE of VOCAB tokens "
                        "(e.g. bpe:8192) trained on the corpus when the job is created and kept in --data-dir as "
                        "tokenizer.json (served at /api/tokenizer); nodes train on token ids and never need it. "
                        "Fixed for the job's life (default: %(default)s)")
    p.add_argument("--rules", type=Path, default=None,
                   help="a rulebook (TOML, like shared/default_rules.toml) for a new job; an existing job keeps "
                        "its rules, which change only by vote (default: shared/default_rules.toml)")
    p.add_argument("--ssl-certfile", type=Path, default=None, metavar="PEM",
                   help="serve HTTPS and WSS with this certificate (chain), PEM; with --ssl-keyfile. Default: plain "
                        "HTTP, for loopback or behind a TLS reverse proxy (README: Behind a TLS reverse proxy)")
    p.add_argument("--ssl-keyfile", type=Path, default=None, metavar="PEM",
                   help="the private key of --ssl-certfile, PEM")
    p.add_argument("--forwarded-allow-ips", default=None, metavar="ADDRS",
                   help="comma-separated addresses of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto "
                        "are believed, so that join limits count each node's own address; '*' believes anyone "
                        "(default: $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """The coordinator's options, with `ice_servers`: the job's RTCIceServer list built from --ice-server and the
    TURN credentials (an argparse error, exit status 2, when they do not fit together)."""
    from server.net import rtc

    parser = serve_parser()
    args = parser.parse_args(argv)
    password = args.turn_password
    if password is None and any(rtc.is_turn_url(url) for url in args.ice_server):
        password = os.environ.get(TURN_PASSWORD_ENV)
    try:
        args.ice_servers = rtc.ice_server_list(args.ice_server, args.turn_username, password)
    except ValueError as e:
        parser.error(f"--ice-server: {e}; TURN credentials come from --turn-username and --turn-password "
                     f"(or ${TURN_PASSWORD_ENV})")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("--ssl-certfile and --ssl-keyfile go together: give both for HTTPS, or neither")
    return args


def trainer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server trainer",
                                description="Join a swarmgrad coordinator as a PyTorch trainer.")
    p.add_argument("--coordinator", required=True, help="the coordinator's URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to train: auto picks CUDA when available (default: %(default)s)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun (torchrun --nproc-per-node N -m server trainer ...), how the N ranks train "
                        "as one node: each takes its rows of every step, and ddp keeps a whole model on every "
                        "rank, fsdp shards it across them, for models that do not fit one GPU; rank 0 alone talks "
                        "to the coordinator (default: %(default)s)")
    p.add_argument("--max-rounds", type=int_at_least(0), default=0,
                   help="leave cleanly after this many completed rounds; 0 = until the job ends")
    p.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="restrict WebRTC (ICE) to this local address; repeatable. Default: loopback when the "
                        "coordinator is on loopback")
    p.add_argument("--ice-relay-only", action="store_true",
                   help="use only TURN relay candidates (the coordinator's turn: --ice-server), for networks "
                        "where nothing else gets through; without one no data channel opens")
    p.add_argument("--transport", default="auto", choices=["auto", "webrtc", "websocket"],
                   help="auto tries a WebRTC data channel and falls back to the WebSocket (default: %(default)s)")
    p.add_argument("--key-file", type=Path, default=None,
                   help="keep this node's ed25519 key here, to rejoin as the same node (default: a new key)")
    p.add_argument("--listen", type=listen_option, default=None, metavar="HOST:PORT",
                   help="serve the blobs this trainer holds to its peers over plain HTTP here (PORT 0 picks one), "
                        "and fetch theirs from where they do the same: much faster than data channels, for "
                        "trainers that reach each other directly (a cluster, a LAN). HOST is told to peers: an "
                        "address they reach. Default: data channels only")
    p.add_argument("--name", type=display_name_option, default="", metavar="NAME",
                   help="the name this node is shown under on the leaderboard (/leaderboard), signed with its key: "
                        "at most 40 printable characters (default: none, shown by its id)")
    p.add_argument("--team", type=display_name_option, default="", metavar="TEAM",
                   help="the team whose total this node's credits count towards on the leaderboard; same limits")
    p.add_argument("--metrics-port", type=int_at_least(0), default=0, metavar="PORT",
                   help="serve this trainer's Prometheus metrics (tokens/s, utilisation, inner loss, verdicts) at "
                        "http://HOST:PORT/metrics; 0 = off (default: %(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="the address --metrics-port listens on (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server status", description="Show a coordinator's training run.")
    p.add_argument("--coordinator", default="http://127.0.0.1:8000", help="the coordinator's URL (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON of /api/status")
    return p


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)


def serve(argv: list[str]) -> int:
    args = parse_serve_args(argv)
    _logging(args.log_level)
    import uvicorn

    from server.net import rtc
    from server.net.app import create_app
    from server.coordinator import Coordinator, JobConfig, JobMismatch
    from server.coordinator.store import StoreUnavailable, open_store
    from server.corpus import CorpusError, load_corpus
    from shared.wire import MAX_MESSAGE_BYTES

    try:
        if args.ssl_certfile:  # a missing file or a key that does not fit: an error now, not a traceback later
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        job = JobConfig(model=args.model, inner_steps=args.inner_steps, rounds=args.rounds,
                        deadline_seconds=args.deadline_seconds, lr=args.lr, batch=args.batch, seed=args.seed,
                        codec=args.codec, delta_codec=args.delta_codec, aggregator=args.aggregator,
                        verify_share=args.verify_share, tokenizer=args.tokenizer, overlap=args.overlap)
        corpus = load_corpus(args.data)
        ice = args.ice_host
        if not ice and ipaddress.ip_address(args.host if args.host != "localhost" else "127.0.0.1").is_loopback:
            ice = ["127.0.0.1" if ":" not in args.host else "::1"]
        rtc.restrict_ice_hosts(ice)
        rules = args.rules.read_text() if args.rules else None
        store = open_store(args.store or args.data_dir / "state.db")
        coordinator = Coordinator(args.data_dir, job, corpus, store=store, rules_toml=rules, peers=args.peers,
                                  ice_servers=args.ice_servers)
    except (ValueError, KeyError, OSError, CorpusError, JobMismatch, StoreUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scheme = "https" if args.ssl_certfile else "http"
    url = f"{scheme}://{args.host if ':' not in args.host else '[' + args.host + ']'}:{args.port}"
    print(f"swarmgrad coordinator: {url}\n  model {job.model} ({coordinator.job.tokenizer} tokens), "
          f"corpus {corpus.name} ({len(corpus.train):,} bytes), "
          f"data in {args.data_dir}/\n  open {url} in a browser, or join with: "
          f"python -m server trainer --coordinator {url}", flush=True)
    print(model_size_line(coordinator), flush=True)
    config = uvicorn.Config(create_app(coordinator), host=args.host, port=args.port, log_level="warning",
                            ws_max_size=2 * MAX_MESSAGE_BYTES, lifespan="on",
                            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                            forwarded_allow_ips=args.forwarded_allow_ips)
    uvicorn.Server(config).run()
    return 0


def model_size_line(coordinator) -> str:
    """The model's size and what training it takes (shared.model.training_memory), for the startup banner."""
    from shared.model import format_bytes

    m = coordinator.describe()["memory"]
    return (f"  {m['parameters']:,} parameters ({format_bytes(m['model_bytes'])} in fp32); training needs about "
            f"{format_bytes(m['total_bytes'])} per node at batch {coordinator.describe()['batch']}, its largest "
            f"buffer {format_bytes(m['largest_buffer_bytes'])}")


def trainer(argv: list[str]) -> int:
    args = trainer_parser().parse_args(argv)
    _logging(args.log_level)
    from server.trainer import Trainer, TrainerOptions, configure_ice
    from shared.node import Refused

    options = TrainerOptions(args.coordinator, args.device, args.max_rounds, args.ice_host, args.transport,
                             args.key_file, not args.no_progress, args.ice_relay_only, args.listen,
                             args.name, args.team, metrics_port=args.metrics_port,
                             metrics_host=args.metrics_host)
    try:
        configure_ice(options)
        from server import distributed

        if distributed.world_size() > 1:  # started by torchrun: one node of several ranks
            return distributed.run(options, args.parallel)
        node = Trainer(options)
        return asyncio.run(node.run())
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def fetch_status(coordinator: str) -> dict:
    url = coordinator.rstrip("/") + "/api/status"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def format_status(s: dict) -> str:
    job = s["job"]
    loss = "n/a" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    lines = [f"job: model {job['model']} ({job['params']:,} parameters), H={job['inner_steps']}, "
             f"aggregator {job['aggregator']}, codec {job['codec']}"
             f"{', overlapped rounds' if job.get('overlap') else ''}",
             f"state: {s['state']}, {s['round']} round(s) completed, validation loss {loss}", "",
             f"{'round':>5}  {'val_loss':>9}  {'accepted':>8}  {'rejected':>8}  {'tokens':>10}"]
    for h in s["history"]:
        v = "n/a" if h["val_loss"] is None else f"{h['val_loss']:.4f}"
        lines.append(f"{h['round']:>5}  {v:>9}  {h['accepted']:>8}  {h['rejected']:>8}  {h['tokens']:>10,}")
    lines += ["", f"{'node':<14}  {'kind':<8}  {'state':<11}  {'path':<12}  {'accepted':>8}  {'tok/s':>8}  "
                  f"{'busy':>5}  {'peers':>5}  {'reputation':>10}  {'credits':>12}"]
    for n in s["nodes"]:
        speed, busy = n.get("tokens_per_second"), n.get("utilisation")
        lines.append(f"{n['id'][:12] + '…':<14}  {n['kind']:<8}  {n['state']:<11}  {n['path'] or '-':<12}  "
                     f"{n['updates_accepted']:>8}  {'-' if speed is None else f'{speed:,.0f}':>8}  "
                     f"{'-' if busy is None else f'{busy:.0%}':>5}  {n.get('peers', 0):>5}  "
                     f"{n.get('reputation', 0):>10}  {n.get('balance', 0) / 1e6:>12,.6f}")
    return "\n".join(lines)


def status(argv: list[str]) -> int:
    args = status_parser().parse_args(argv)
    try:
        s = fetch_status(args.coordinator)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"error: cannot read {args.coordinator}/api/status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "serve"
    if argv and argv[0] == command:
        argv = argv[1:]
    if command in ("ledger", "governance"):
        from server import books_cli

        return getattr(books_cli, command)(argv)
    if command == "simulate":
        from server import sim

        return sim.main(argv)
    if command in ("export", "sample"):
        from server import export, sample

        return {"export": export, "sample": sample}[command].main(argv)
    return {"serve": serve, "trainer": trainer, "status": status}[command](argv)
