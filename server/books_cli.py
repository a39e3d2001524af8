"""The `ledger` and `governance` commands: verify and show the books, list rules, propose and vote.

`ledger verify` reads the store directly (opened read-only: the data directory's SQLite file, or --store's
PostgreSQL database), so it can audit a coordinator that is not running; docs/LEDGER.md says what it checks. Never
write to the store from here; proposals and votes go through the coordinator's REST API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from server.keys import NodeKey, SignatureError, verify
from server.coordinator.store import (OutdatedSchema, RoundRecord, Store, StoreUnavailable, driver_errors,
                                     open_store)
from shared.governance import Proposal, Vote
from shared.identity import validate_node_id
from shared.rewards import (ChainFault, LedgerError, check_anchors, check_chain, check_rewards, round_record_bytes,
                            terms_by_round)

MICRO = 1_000_000
STORE_HELP = "read the coordinator's PostgreSQL store (its --store URL) instead of DATA_DIR/state.db"
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


def open_books(data_dir: Path, store: str | None = None) -> Store:
    """The coordinator's store, read-only (auditing never creates, migrates or writes anything): the PostgreSQL
    database at `store` when given, else the data directory's SQLite file."""
    return open_store(store or data_dir / "state.db", read_only=True)


def coordinator_id_of(data_dir: Path, given: str | None) -> str:
    """The public id the round records must be signed by: the one given (what an auditor trusts, e.g. from
    GET /api/status), else the one derived from the data directory's own coordinator.key."""
    if given:
        return validate_node_id(given)
    key_path = data_dir / "coordinator.key"
    if not key_path.exists():
        raise FileNotFoundError(f"no {key_path}: pass --coordinator-id (the coordinator's public id, "
                                "coordinator_id in GET /api/status)")
    return NodeKey.load_or_create(key_path).node_id  # it exists: this only reads it


def _signed(coordinator_id: str, record: RoundRecord) -> bool:
    try:
        verify(coordinator_id, round_record_bytes(record.round, record.model_hash, record.ledger_head),
               record.signature)
        return True
    except SignatureError:
        return False


def _at(fault: ChainFault, entries: list) -> str:
    return f"entry {fault.index}" if fault.index < len(entries) else f"the end of the log ({len(entries)} entries)"


def audit_books(store: Store, coordinator_id: str) -> list[str]:
    """Every reason the books do not check out; empty when they do. Checks, in order: the hash chain and the
    balance table recomputed from the log; each round record's signature by `coordinator_id`; the signed ledger
    heads against the chain; every reward recomputed from its update record under the terms then in force.
    Everything is read in one snapshot, so a round its coordinator commits meanwhile cannot look like a fault."""
    with store.snapshot():
        return _audit(store, coordinator_id)


def _audit(store: Store, coordinator_id: str) -> list[str]:
    entries, rounds = store.ledger_entries(), store.rounds()
    failures = []
    fault = check_chain(entries, balances=store.balances())
    if fault is not None:
        failures.append(f"at {_at(fault, entries)}: {fault.reason}")
    unsigned = [r.round for r in rounds if not _signed(coordinator_id, r)]
    if unsigned:
        more = f" (and {len(unsigned) - 1} later rounds)" if len(unsigned) > 1 else ""
        failures.append(f"round {unsigned[0]}{more}: the record does not carry coordinator {coordinator_id[:16]}...'s "
                        "signature over (round, model hash, ledger head): it was edited, or signed by another key")
    fault = check_anchors(entries, [(r.round, r.ledger_head) for r in rounds])
    if fault is not None:
        failures.append(f"at {_at(fault, entries)}: {fault.reason}")
    governance = store.get_meta("governance") or {}
    try:
        terms = terms_by_round(governance.get("params", {}), governance.get("audit", []), [r.round for r in rounds])
    except LedgerError as e:
        failures.append(f"reward terms: {e}")
    else:
        fault = check_rewards(entries, [dataclasses.asdict(u) for u in store.updates()], terms)
        if fault is not None:
            failures.append(f"at {_at(fault, entries)}: {fault.reason}")
    return failures


def ledger_verify(args) -> int:
    try:
        store = open_books(args.data_dir, args.store)
        try:
            coordinator_id = coordinator_id_of(args.data_dir, args.coordinator_id)  # ValueError when malformed
            with store.snapshot():  # the audit and the summary read the same books
                failures = audit_books(store, coordinator_id)
                entries, rounds, balances = store.ledger_entries(), store.rounds(), store.balances()
        finally:
            store.close()
    except (FileNotFoundError, ValueError, OutdatedSchema, StoreUnavailable, *driver_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"ledger verification FAILED {failure}", file=sys.stderr)
    if failures:
        return 1
    head = entries[-1]["hash"] if entries else "-"
    rewards = sum(e["kind"] == "reward" for e in entries)
    print(f"ledger intact: {len(entries)} entries, chain head {head}, {len(balances)} accounts, balances recomputed "
          f"from the log match the stored ones (sum {sum(balances.values())}); {len(rounds)} round records signed "
          f"by coordinator {coordinator_id}, the last anchoring the head; {rewards} rewards recomputed from their "
          "updates")
    return 0


def ledger_balances(args) -> int:
    try:
        if args.coordinator:
            balances = _get(args.coordinator, "/api/ledger")["balances"]
        else:
            balances = open_books(args.data_dir, args.store).balances()
    except (OSError, ValueError, StoreUnavailable, *driver_errors()) as e:
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
    status = _get(coordinator, "/api/status")
    return int(status.get("current_round", status["round"]))  # (a round settling counts: its boundary is passed)


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
            if "stamped round" not in str(e):  # shared.governance's words for a stamp the coordinator refused
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
    v = sub.add_parser("verify", help="recompute the hash chain, every balance and every reward from the log, and "
                                      "check the coordinator's signature on every round record")
    v.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"))
    v.add_argument("--store", default=None, metavar="URL", help=STORE_HELP)
    v.add_argument("--coordinator-id", default=None, help="the coordinator's public id (64 hex characters) that "
                                                           "signed the rounds (default: from DATA_DIR/coordinator.key)")
    v.set_defaults(run=ledger_verify)
    b = sub.add_parser("balances", help="show every account's balance")
    b.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"))
    b.add_argument("--store", default=None, metavar="URL", help=STORE_HELP)
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
