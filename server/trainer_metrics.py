"""A trainer's own Prometheus metrics (`python -m server trainer --metrics-port P`): throughput, utilisation, inner
loss and its updates' verdicts, from the events the node reports to its port and the trainer's inner steps.

Never let metrics change what the trainer does: they only listen, and serving them is off unless asked for.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("swarmgrad.trainer")

DEFAULT_METRICS_HOST = "127.0.0.1"  # a trainer's numbers are its operator's business: loopback unless told


class TrainerMetrics:
    """The trainer's series, in a registry of its own. `observe` takes every event shared/node.py reports,
    `inner_step` each inner step's loss and throughput, `trained` each round's training time."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.tokens_per_second = Gauge("swarmgrad_trainer_tokens_per_second", "Training throughput: of the "
                                       "inner steps so far in the current round", registry=r)
        self.inner_loss = Gauge("swarmgrad_trainer_inner_loss", "Loss of the last inner step", registry=r)
        self.utilisation = Gauge("swarmgrad_trainer_utilisation", "Training time over wall time, from one round's "
                                 "assignment to the next (as the node reports it to the coordinator)", registry=r)
        self.training_seconds = Counter("swarmgrad_trainer_training_seconds", "Seconds spent in inner steps",
                                        registry=r)
        self.rounds = Counter("swarmgrad_trainer_rounds", "Rounds this trainer sent an update for and heard the "
                              "verdict", registry=r)
        self.accepted = Counter("swarmgrad_trainer_updates_accepted", "Updates the coordinator accepted", registry=r)
        self.rejected = Counter("swarmgrad_trainer_updates_rejected", "Updates the coordinator rejected, by rule",
                                ["rule"], registry=r)
        self.model_bytes = Counter("swarmgrad_trainer_model_bytes", "Model bytes fetched (snapshots and deltas), "
                                   "by where they came from", ["source"], registry=r)
        self.round = Gauge("swarmgrad_trainer_round", "The round this trainer was last assigned (rounds completed "
                           "once it commits)", registry=r)
        self._assigned_at: float | None = None  # when the current round's assignment came
        self._trained_s = 0.0  # training seconds since then
        self.server = None

    def observe(self, event: str, fields: dict) -> None:
        if event == "round":
            now = self.clock()
            if self._assigned_at is not None and self._trained_s > 0 and now > self._assigned_at:
                self.utilisation.set(min(1.0, self._trained_s / (now - self._assigned_at)))
            self._assigned_at, self._trained_s = now, 0.0
            self.round.set(fields["round"])
        elif event == "update":
            self.rounds.inc()
            if fields["accepted"]:
                self.accepted.inc()
            else:
                self.rejected.labels(fields["rule"] or "unknown").inc()
        elif event == "model" and fields["source"] in ("blobs", "delta"):
            self.model_bytes.labels("peers").inc(fields["from_peers"])
            self.model_bytes.labels("coordinator").inc(fields["from_coordinator"])
        elif event == "model":
            self.model_bytes.labels("coordinator").inc(fields["bytes"])

    def inner_step(self, loss: float, tokens_per_second: float) -> None:
        self.inner_loss.set(loss)
        self.tokens_per_second.set(tokens_per_second)

    def trained(self, seconds: float) -> None:
        self._trained_s += seconds
        self.training_seconds.inc(seconds)

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics over HTTP on a daemon thread; returns its URL. OSError when the address is taken."""
        self.server, _ = start_http_server(port, host, self.registry)
        bound_host, bound_port = self.server.server_address[:2]
        url = f"http://{bound_host if ':' not in bound_host else '[' + bound_host + ']'}:{bound_port}/metrics"
        log.info("serving this trainer's metrics at %s", url)
        return url

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
