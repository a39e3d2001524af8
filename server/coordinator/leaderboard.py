"""The leaderboard (GET /api/leaderboard, /leaderboard): every node and every team ranked by credits, as JSON or as
a CSV export whose columns never change order (NODE_COLUMNS, TEAM_COLUMNS; README "Leaderboard").

Never change state here: like the status view it only reads, so that polling it cannot alter a round.
"""

from __future__ import annotations

import csv
import io
import time
from typing import TYPE_CHECKING

from shared.rewards import MICRO

if TYPE_CHECKING:
    from server.coordinator.coordinator import Coordinator

# The CSV columns, in their fixed order. New columns may only ever be added at the end.
NODE_COLUMNS = ("rank", "node_id", "name", "team", "kind", "credits", "accepted_updates", "tokens", "rounds",
                "last_seen")
TEAM_COLUMNS = ("rank", "team", "members", "credits", "accepted_updates", "tokens", "rounds", "last_seen")


def _ranked(rows: list[dict], key: str) -> list[dict]:
    """Most credits first; ties by accepted updates, then tokens, then `key`, so that the order is stable."""
    rows.sort(key=lambda r: (-r["credits_micro"], -r["accepted_updates"], -r["tokens"], r[key]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def leaderboard(coordinator: Coordinator) -> dict:
    """{"nodes": [...], "teams": [...], "generated_at"}: each row has rank, credits_micro (the ledger balance, in
    integer micro-credits), accepted_updates, tokens (of accepted updates), rounds (rounds with an accepted update)
    and last_seen (Unix seconds); a node row also id, name, team and kind, a team row team and members. Nodes
    without a team are in no team row."""
    store, ledger = coordinator.store, coordinator.governor.ledger
    rounds = store.contributed_rounds()
    nodes = [{"id": n["id"], "name": n["name"], "team": n["team"], "kind": n["kind"],
              "credits_micro": ledger.balance(n["id"]), "accepted_updates": n["updates_accepted"],
              "tokens": n["tokens"], "rounds": rounds.get(n["id"], 0), "last_seen": n["last_seen"]}
             for n in store.nodes()]
    teams: dict[str, dict] = {}
    for n in nodes:
        if not n["team"]:
            continue
        t = teams.setdefault(n["team"], {"team": n["team"], "members": 0, "credits_micro": 0, "accepted_updates": 0,
                                         "tokens": 0, "rounds": 0, "last_seen": 0.0})
        t["members"] += 1
        for field in ("credits_micro", "accepted_updates", "tokens"):
            t[field] += n[field]
        t["last_seen"] = max(t["last_seen"], n["last_seen"])
    for team, count in store.team_contributed_rounds().items():
        if team in teams:
            teams[team]["rounds"] = count
    return {"nodes": _ranked(nodes, "id"), "teams": _ranked(list(teams.values()), "team"),
            "generated_at": time.time()}


def credits_text(micro: int) -> str:
    """Integer micro-credits as an exact decimal: 1234567 -> "1.234567" (never through a float)."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def utc_text(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC to the second: 2025-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def to_csv(board: dict, table: str = "nodes") -> str:
    """One table of `leaderboard()` as CSV (RFC 4180: a header row, CRLF line ends, fields quoted when they hold a
    comma, a quote or a line break, quotes doubled). credits is an exact decimal, last_seen ISO 8601 UTC."""
    columns = NODE_COLUMNS if table == "nodes" else TEAM_COLUMNS
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    for row in board[table]:
        values = {**row, "node_id": row.get("id"), "credits": credits_text(row["credits_micro"]),
                  "last_seen": utc_text(row["last_seen"])}
        writer.writerow([values[c] for c in columns])
    return out.getvalue()
