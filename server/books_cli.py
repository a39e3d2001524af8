"""The `ledger` and `governance` commands: verify and show the books, list rules, propose and vote.

`ledger verify` reads the data directory directly, so it can audit a coordinator that is not running.
Never write to the store from here; proposals and votes go through the coordinator's REST API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
import urllib.error
import urllib.request
from pathlib import Path

from server.keys import NodeKey
from shared.governance import Proposal, Vote
from shared.rewards import check_chain

MICRO = 1_000_000
STAMP_TRIES = 3  # a round may close between reading the round and posting; then re-stamp and re-sign


def _get(coordinator: str, path: str) -> dict:
    with urllib.request.urlopen(coordinator.rstrip("/") + path, timeout=10) as r:
        return json.load(r)


def _post(coordinator: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(coordinator.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError):
            pass
        raise RuntimeError(detail) from None


def _credits(micro: int) -> str:
    return f"{micro / MICRO:,.6f}"


# -- ledger ------------------------------------------------------------------------------------------------


def read_books(data_dir: Path) -> tuple[list[dict], dict[str, int], str | None]:
    """The ledger entries, the stored balance table and the last committed round's ledger head."""
    db_path = data_dir / "state.db"
    if not db_path.exists():
        raise FileNotFoundError(f"no coordinator state in {data_dir} (expected {db_path})")
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        entries = [json.loads(row[0]) for row in db.execute("SELECT entry FROM ledger ORDER BY seq")]
        balances = dict(db.execute("SELECT account, amount FROM balances"))
        row = db.execute("SELECT ledger_head FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
    head = row[0] if row and row[0] else None
    return entries, balances, head


def ledger_verify(args) -> int:
    try:
        entries, balances, head = read_books(args.data_dir)
    except (FileNotFoundError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fault = check_chain(entries, head=head, balances=balances)
    if fault is not None:
        where = f"entry {fault.index}" if fault.index < len(entries) else f"the end of the log ({len(entries)} entries)"
        print(f"ledger verification FAILED at {where}: {fault.reason}", file=sys.stderr)
        return 1
    total = sum(balances.values())
    print(f"ledger intact: {len(entries)} entries, chain head {head or '-'}, {len(balances)} accounts, "
          f"balances recomputed from the log match the stored ones (sum {total})")
    return 0


def ledger_balances(args) -> int:
    try:
        if args.coordinator:
            balances = _get(args.coordinator, "/api/ledger")["balances"]
        else:
            balances = read_books(args.data_dir)[1]
    except (OSError, sqlite3.Error, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(balances, indent=2))
        return 0
    print(f"{'account':<72}  {'credits':>16}")
    for account, amount in sorted(balances.items(), key=lambda kv: -kv[1]):
        print(f"{account:<72}  {_credits(amount):>16}")
    return 0


# -- governance --------------------------------------------------------------------------------------------


def governance_list(args) -> int:
    try:
        g = _get(args.coordinator, "/api/governance")
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.coordinator}/api/governance: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(g, indent=2))
        return 0
    print(f"quorum {g['quorum']}, threshold {g['threshold']}, last boundary round {g['boundary']}\n")
    print("parameters:")
    for name, value in sorted(g["params"].items()):
        print(f"  {name:<24} {value}")
    print("\nrules in force:")
    for rule in g["rules"]:
        flags = ("" if rule.get("enabled", True) else " (disabled)") + (" [slash]" if rule.get("slash") else "")
        print(f"  {rule['id']:<22} {rule['action']:<13} {rule['reason']}{flags}")
    print("\nproposals:")
    if not g["proposals"]:
        print("  none")
    for p in g["proposals"]:
        prop = p["proposal"]
        tally = p.get("tally")
        votes = f", yes {tally['yes_weight']} of {tally['voted_weight']} voted / {tally['total_weight']}" if tally else ""
        print(f"  {prop['id']}  {p['status']:<8} {prop['kind']} "
              f"{json.dumps(prop['payload'])} (round {prop['round']}{votes})")
    return 0


def _current_round(coordinator: str) -> int:
    return int(_get(coordinator, "/api/status")["round"])


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word, e.g. an aggregator name


def _post_stamped(coordinator: str, path: str, make) -> dict:
    """Post `make(current_round)` (a signed Proposal or Vote). A round may close between reading the round and
    the post landing, and the coordinator then refuses the stale stamp: stamp and sign anew, a few times."""
    for _ in range(STAMP_TRIES - 1):
        try:
            return _post(coordinator, path, make(_current_round(coordinator)).to_dict())
        except RuntimeError as e:
            if "before boundary" not in str(e) and "predates" not in str(e):
                raise
    return _post(coordinator, path, make(_current_round(coordinator)).to_dict())


def governance_propose(args) -> int:
    key = NodeKey.load_or_create(args.key_file)
    if args.set_param:
        name, _, value = args.set_param.partition("=")
        kind, payload = "set_param", {"name": name, "value": _parse_value(value)}
    elif args.remove_rule:
        kind, payload = "remove_rule", {"rule_id": args.remove_rule}
    else:
        kind = "add_rule" if args.add_rule else "change_rule"
        payload = {"rule": json.loads(args.add_rule or args.change_rule)}

    def signed(round_: int) -> Proposal:
        proposal = Proposal(key.node_id, kind, payload, round_, args.note)
        return dataclasses.replace(proposal, signature=key.sign(proposal.signing_bytes()))

    try:
        state = _post_stamped(args.coordinator, "/api/governance/proposals", signed)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    proposal_id = state["proposal"]["id"]
    print(f"proposal {proposal_id} is open ({state['status']}); vote with: python -m server governance vote "
          f"--coordinator {args.coordinator} --key-file KEY {proposal_id} yes")
    return 0


def governance_vote(args) -> int:
    key = NodeKey.load_or_create(args.key_file)

    def signed(round_: int) -> Vote:
        vote = Vote(args.proposal_id, key.node_id, args.choice == "yes", round_)
        return dataclasses.replace(vote, signature=key.sign(vote.signing_bytes()))

    try:
        _post_stamped(args.coordinator, "/api/governance/votes", signed)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"vote recorded: {args.choice} on {args.proposal_id} by {key.node_id[:12]}…")
    return 0


def ledger_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server ledger", description="Audit and show the reward ledger.")
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("verify", help="recompute the hash chain and every balance from the log")
    v.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"))
    v.set_defaults(run=ledger_verify)
    b = sub.add_parser("balances", help="show every account's balance")
    b.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"))
    b.add_argument("--coordinator", default=None, help="read from a running coordinator instead of --data-dir")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=ledger_balances)
    return p


def governance_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server governance", description="Rules, proposals and votes.")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="rules in force, job parameters, proposals and their tallies")
    ls.add_argument("--coordinator", default="http://127.0.0.1:8000")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=governance_list)
    pr = sub.add_parser("propose", help="propose a change, signed with your node key")
    pr.add_argument("--coordinator", default="http://127.0.0.1:8000")
    pr.add_argument("--key-file", type=Path, required=True, help="your node's key (e.g. the trainer's --key-file)")
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument("--set-param", metavar="NAME=VALUE", help="e.g. inner_steps=100 or aggregator=median")
    what.add_argument("--add-rule", metavar="JSON", help='e.g. {"id": ..., "action": ..., "condition": ..., "reason": ...}')
    what.add_argument("--change-rule", metavar="JSON")
    what.add_argument("--remove-rule", metavar="RULE_ID")
    pr.add_argument("--note", default="", help="why, for the voters")
    pr.set_defaults(run=governance_propose)
    vo = sub.add_parser("vote", help="vote on an open proposal, weighted by your reputation")
    vo.add_argument("--coordinator", default="http://127.0.0.1:8000")
    vo.add_argument("--key-file", type=Path, required=True)
    vo.add_argument("proposal_id")
    vo.add_argument("choice", choices=["yes", "no"])
    vo.set_defaults(run=governance_vote)
    return p


def ledger(argv: list[str]) -> int:
    args = ledger_parser().parse_args(argv)
    return args.run(args)


def governance(argv: list[str]) -> int:
    args = governance_parser().parse_args(argv)
    return args.run(args)
