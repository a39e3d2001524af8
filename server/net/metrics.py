"""The coordinator's Prometheus metrics (GET /metrics): rounds, bytes, updates by outcome and rule, nodes, loss, the
ledger's totals and intake's queues, read from the coordinator's live state and its store at scrape time.

Never count anything here: every value is read from what /api/status, the store and the ledger already hold, so
the two views cannot disagree and the counters survive a restart. Never change state: a scrape only reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from shared.rewards import FEES, MINT, SLASHED, STAKE_PREFIX, SYSTEM_ACCOUNTS

if TYPE_CHECKING:
    from server.coordinator.coordinator import Coordinator

# a round lasts from seconds (tiny, on one machine) to an hour (base, with browsers at a long deadline)
ROUND_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def rule_of(reason: str) -> str:
    """The rule id(s) in a rejected update's stored reason ("rule: why"; several rules are comma-joined)."""
    return reason.split(": ", 1)[0] or "unknown"


class CommittedRounds:
    """What only a commit changes (round durations, rejections by rule), read from the store once per committed
    round rather than on every scrape: the updates table grows with every node and round."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.durations: list[float] = []
        self.rejected_by_rule: Counter[str] = Counter()
        self.accepted = 0

    def refresh(self, coordinator: Coordinator, committed: int) -> None:
        """Read the store again if a round was committed since (`committed`: the last committed round, as the
        status counts it; the coordinator's own round may run one ahead while a closed round settles)."""
        if self.round == committed:
            return
        store = coordinator.store
        # round 0 is the initial model: it was written, not trained, and took no time
        self.durations = [r.closed_at - r.opened_at for r in store.rounds() if r.round > 0]
        updates = store.updates()
        self.accepted = sum(1 for u in updates if u.accepted)
        self.rejected_by_rule = Counter(rule_of(u.reason) for u in updates if not u.accepted)
        self.round = committed


class CoordinatorCollector(Collector):
    """One scrape: /api/status's view (server/coordinator/status.py), the committed rounds and the ledger."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.committed = CommittedRounds()

    def collect(self) -> Iterator[Metric]:
        c = self.coordinator
        s = c.status()
        self.committed.refresh(c, s["round"])
        history = [h for h in s["history"] if h["round"] > 0]
        yield from self._rounds(s, history)
        yield from self._updates()
        yield from self._nodes(s)
        yield from self._queues(s)
        yield from self._ledger()

    def _rounds(self, s: dict, history: list[dict]) -> Iterator[Metric]:
        yield CounterMetricFamily("swarmgrad_rounds", "Rounds committed (trained and stored; the initial model is "
                                  "not one)", value=s["round"])
        durations = self.committed.durations
        buckets = [(str(bound), sum(1 for d in durations if d <= bound)) for bound in ROUND_SECONDS_BUCKETS]
        rounds = HistogramMetricFamily("swarmgrad_round_duration_seconds", "Committed rounds, from opening to closing")
        rounds.add_metric([], buckets + [("+Inf", len(durations))], sum(durations))
        yield rounds
        yield CounterMetricFamily("swarmgrad_received_bytes", "Update payload bytes accepted in committed rounds",
                                  value=sum(h["bytes"] for h in history))
        yield CounterMetricFamily("swarmgrad_sent_bytes", "Bytes the coordinator sent while committed rounds were "
                                  "open: over links and as blobs", value=sum(h["coordinator_bytes_out"] for h in history))
        yield CounterMetricFamily("swarmgrad_tokens", "Tokens of the updates accepted in committed rounds",
                                  value=sum(h["tokens"] for h in history))
        loss = GaugeMetricFamily("swarmgrad_validation_loss", "Validation loss of the last committed model")
        if s["val_loss"] is not None:
            loss.add_metric([], s["val_loss"])
        yield loss
        yield GaugeMetricFamily("swarmgrad_round_deadline_seconds", "Seconds the next round waits for updates",
                                value=s["job"]["deadline_seconds"])
        yield GaugeMetricFamily("swarmgrad_finished", "1 once the job has run its rounds",
                                value=1 if s["state"] == "finished" else 0)

    def _updates(self) -> Iterator[Metric]:
        yield CounterMetricFamily("swarmgrad_updates_accepted", "Updates accepted in committed rounds",
                                  value=self.committed.accepted)
        rejected = CounterMetricFamily("swarmgrad_updates_rejected", "Updates rejected in committed rounds, by the "
                                       "rule that refused them (comma-joined when several did)", labels=["rule"])
        for rule, count in sorted(self.committed.rejected_by_rule.items()):
            rejected.add_metric([rule], count)
        yield rejected

    def _nodes(self, s: dict) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("swarmgrad_nodes", "Nodes the coordinator knows, by kind and state (offline: not "
                                  "connected now)", labels=["kind", "state"])
        for (kind, state), count in sorted(Counter((n["kind"], n["state"]) for n in s["nodes"]).items()):
            nodes.add_metric([kind, state], count)
        yield nodes

    def _queues(self, s: dict) -> Iterator[Metric]:
        intake, open_round = s["intake"], s["open_round"] or {}
        yield GaugeMetricFamily("swarmgrad_intake_pending_payloads", "Signed updates waiting for their bytes",
                                value=intake["pending_payloads"])
        yield GaugeMetricFamily("swarmgrad_intake_deferred_payloads", "Updates that arrived while a round closed, "
                                "waiting for the next round", value=intake["deferred"])
        yield CounterMetricFamily("swarmgrad_intake_errors", "Settle and commit failures survived since the "
                                  "coordinator started", value=intake["errors"])
        yield GaugeMetricFamily("swarmgrad_open_round_assigned_nodes", "Nodes assigned work in the open round",
                                value=open_round.get("assigned", 0))
        yield GaugeMetricFamily("swarmgrad_open_round_reported_nodes", "Nodes whose update the open round has "
                                "decided", value=open_round.get("reported", 0))

    def _ledger(self) -> Iterator[Metric]:
        # the governor's ledger is the committed one at any point a scrape can run: the coordinator settles a
        # round's entries and commits them to the store without giving the event loop a turn in between
        ledger = self.coordinator.governor.ledger
        entries = CounterMetricFamily("swarmgrad_ledger_entries", "Ledger entries, by kind", labels=["kind"])
        for kind, count in sorted(Counter(e.kind for e in ledger.entries).items()):
            entries.add_metric([kind], count)
        yield entries
        balances = ledger.balances()
        yield CounterMetricFamily("swarmgrad_ledger_minted_micro_credits", "Micro-credits minted (grants and "
                                  "rewards): the money supply", value=-balances.get(MINT, 0))
        held = GaugeMetricFamily("swarmgrad_ledger_held_micro_credits", "Where the minted micro-credits are: nodes' "
                                 "balances, their stakes, fees, slashed", labels=["holder"])
        stakes = sum(v for a, v in balances.items() if a.startswith(STAKE_PREFIX))
        nodes = sum(v for a, v in balances.items() if a not in SYSTEM_ACCOUNTS and not a.startswith(STAKE_PREFIX))
        for holder, amount in (("nodes", nodes), ("stakes", stakes), ("fees", balances.get(FEES, 0)),
                               ("slashed", balances.get(SLASHED, 0))):
            held.add_metric([holder], amount)
        yield held


def metrics_endpoint(coordinator: Coordinator):
    """GET /metrics: the Prometheus text format, from a registry of this app's own (never the process-global one,
    so that two coordinators in one process, as in tests, do not share series)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator))

    async def metrics(request: Request) -> Response:
        # on the event loop, like /api/status: a round's commit cannot interleave with a scrape
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
