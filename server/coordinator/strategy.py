"""The round strategy: what a round asks of nodes and how its updates become the next model (Flower's Strategy).

It builds the round config, aggregates with the rule in force (a robust rule with too few updates for its f falls
back to the mean, and says so), applies the outer Nesterov step, scores each update's quality and measures the
validation loss. Never touch the held model, the books or the store: it returns values, and the coordinator
commits them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
import torch

from server import aggregation
from server.codecs import TorchErrorFeedback, apply_delta
from server.coordinator.job import JobConfig
from server.coordinator.model_state import GlobalModel
from server.corpus import Corpus
from server.model import GPT, flat_parameters, init_parameters, load_flat_parameters, parameter_views
from server.training import evaluate, validation_batches
from shared.aggregate import AggregationError
from shared.compress import CodecSpec, parse_codec
from shared.governance import Governance
from shared.model import GPTConfig
from shared.rewards import quality_to_ppm

log = logging.getLogger("swarmgrad.coordinator")

QUALITY_BATCH_SEED = 99  # the held-out batch that scores updates: never one the validation loss is measured on
# the rules and params a round config carries for planning, at most, as JSON: a RoundOpen must stay one control
# message (shared.wire.MAX_CONTROL_BYTES, 64 KiB), and a rulebook voted larger than this must not stop the rounds
MAX_PLANNING_BYTES = 32_768


def outer_nesterov_step(params: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor | None, lr: float,
                        mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD(nesterov=True, dampening=0) on a pseudo-gradient; the math of shared.diloco.OuterNesterov."""
    buf = grad.clone() if momentum is None else momentum * mu + grad
    return params - lr * (grad + mu * buf), buf


def overlapped(governed: Mapping) -> bool:
    """Whether rounds overlap under these governed parameters (a job stored before `overlap` existed: no)."""
    return governed.get("overlap", False) is True


class RoundStrategy:
    """One job's round policy. The governed parameters in force are passed to each call (votes change them
    between rounds); the job fixes the model, the codec, the weight decay and the share f of updates a robust
    rule is told to tolerate."""

    def __init__(self, job: JobConfig, cfg: GPTConfig, codec: CodecSpec, corpus: Corpus):
        self.job, self.cfg, self.codec = job, cfg, codec
        self.delta_codec = parse_codec(job.delta_codec)
        self.delta_residual: torch.Tensor | None = None  # what earlier deltas' encoding left out (not kept on restart)
        self._model = GPT(cfg)  # evaluates parameters; used by one round's close at a time
        self._val_batches = validation_batches(corpus.validation, cfg.block_size, vocab_size=cfg.vocab_size)
        # quality of an update: the loss change it alone makes on a held-out batch not used for validation
        self._quality_batch = validation_batches(corpus.validation, cfg.block_size, num_batches=1,
                                                 seed=QUALITY_BATCH_SEED, vocab_size=cfg.vocab_size)

    # -- configure ------------------------------------------------------------------------------------------

    def initial_parameters(self, seed: int) -> np.ndarray:
        """A new job's model: flat float32, initialised from `seed`."""
        init_parameters(self._model, seed)
        return flat_parameters(self._model).numpy()

    def round_config(self, governance: Governance, deadline_seconds: float) -> dict:
        """What nodes run this round: the governed parameters in force and the policy's deadline, and what a node
        needs to plan its round (shared.agent.RoundPlanner): the round_config rules in force and the governed
        parameters, each as GET /api/governance lists them."""
        p = governance.params
        config = {"inner_steps": int(p["inner_steps"]), "lr": float(p["lr"]), "weight_decay": self.job.weight_decay,
                  "batch": int(p["batch"]), "seq_len": self.cfg.block_size,
                  "codec": self.codec.to_dict(), "deadline_seconds": deadline_seconds,
                  # nodes start the next round at once, without waiting for this one's verdict (Coordinator.run)
                  "overlap": overlapped(p)}
        planning = {"rules": [rule.to_dict() for rule in governance.rules.for_action("round_config")],
                    "params": dict(p)}
        size = len(json.dumps(planning))
        if size > MAX_PLANNING_BYTES:  # nodes then run the assignment as given, as without the rules
            log.warning("the round_config rules and params take %d bytes of JSON, more than a round config carries "
                        "(%d); nodes are sent the assignment without them", size, MAX_PLANNING_BYTES)
            return config
        return {**config, **planning}

    # -- aggregate ------------------------------------------------------------------------------------------

    def tolerated(self, rule: str, n: int) -> int:
        """The f a robust `rule` is told to tolerate among `n` updates: the job's byzantine share, and for Krum at
        most what its n > 2f + 2 needs."""
        f = int(n * self.job.byzantine_fraction)
        if rule in ("krum", "multikrum"):
            f = min(f, max(0, (n - 3) // 2))
        return f

    def aggregate(self, round_: int, values: list[np.ndarray], weights: list[float],
                  governed: Mapping) -> tuple[np.ndarray | None, list[int]]:
        """The aggregate of the updates (float32) by the rule in force (governed["aggregator"]), and the indices
        the rule discarded as outliers; None when there is no update. Runs in a worker thread: seconds at d = 10M."""
        if not values:
            return None, []
        rule = str(governed["aggregator"])
        matrix = np.stack(values)
        n = len(values)
        try:
            if rule == "mean":
                result = aggregation.RULES["mean"](matrix, weights)
            else:
                result = aggregation.RULES[rule](matrix, None, self.tolerated(rule, n))
        except AggregationError as e:  # too few updates for the rule's f: average this round, and say so
            log.warning("round %d: %s cannot aggregate %d update(s) (%s); using the mean", round_ + 1, rule, n, e)
            result = aggregation.RULES["mean"](matrix, weights)
        out = result.values.numpy() if isinstance(result.values, torch.Tensor) else np.asarray(result.values)
        return out.astype(np.float32), list(result.discarded)

    # -- evaluate -------------------------------------------------------------------------------------------

    def qualities(self, model: GlobalModel, values: list[np.ndarray], governed: Mapping) -> list[int]:
        """Each update's quality in ppm: the loss drop it makes alone on a held-out batch (one outer SGD step
        from `model`), relative to the best update of the round. An update that does not lower the loss scores 0.
        The model runs on views of one reused buffer (torch.func.functional_call): no parameters are loaded."""
        lr = float(governed["outer_lr"])
        params = model.tensor()
        base = self._quality_loss(params)
        stepped = torch.empty_like(params)
        drops = []
        for v in values:
            torch.sub(params, torch.from_numpy(v), alpha=lr, out=stepped)
            drops.append(base - self._quality_loss(stepped))
        best = max(drops, default=0.0)
        return [quality_to_ppm(d / best) if best > 0 else 0 for d in drops]

    @torch.no_grad()
    def _quality_loss(self, flat: torch.Tensor) -> float:
        views = parameter_views(self._model, flat)
        self._model.eval()
        losses = [torch.func.functional_call(self._model, views, (x, y))[1].item() for x, y in self._quality_batch]
        return float(sum(losses) / len(losses))

    def outer_step(self, model: GlobalModel, grad: np.ndarray | None, governed: Mapping,
                   staleness: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The parameters and momentum after one outer Nesterov step on the aggregate `grad`, as new arrays. With
        no aggregate (every update was judged a copy or a fake) they stay as they are.

        `staleness`: how many outer steps `model` took since the model `grad` was computed on (1 for an
        overlapped round, 0 otherwise). A delay of s steps acts as a momentum of s / (1 + s) of its own
        ("Asynchrony begets momentum", Mitliagkas et al., 2016), so the step's momentum is lowered by that much (to
        0 from the default 0.5): with both, the delayed steps overshoot and the loss bounces (bench/README.md,
        "Overlapped rounds", measured this against dividing the learning rate by 1 + s)."""
        params, momentum = model.tensor(), model.momentum_tensor()
        if grad is None:
            return params.numpy().copy(), np.zeros_like(model.params) if momentum is None else momentum.numpy().copy()
        g = torch.from_numpy(np.ascontiguousarray(grad, np.float32))
        stale = max(0, staleness)
        mu = max(0.0, float(governed["outer_momentum"]) - stale / (1 + stale))
        new_params, new_momentum = outer_nesterov_step(params, g, momentum, float(governed["outer_lr"]), mu)
        return new_params.numpy(), new_momentum.numpy()

    def delta(self, model: GlobalModel, params: np.ndarray) -> tuple[np.ndarray, bytes, torch.Tensor]:
        """The round's delta as nodes receive it: (the parameters every node will hold, the current ones plus the
        decoded delta; the encoded delta of `params` - current + the residual; the residual it leaves). Changes
        nothing: the caller keeps the residual once the round commits."""
        feedback = TorchErrorFeedback(model.params.size)
        if self.delta_residual is not None:
            feedback.residual = self.delta_residual.clone()
        payload = feedback.encode(self.delta_codec, torch.from_numpy(params) - model.tensor())
        return apply_delta(model.params, self.delta_codec, payload), payload, feedback.residual

    def evaluate(self, params: np.ndarray) -> float:
        """The validation loss of flat parameters `params`."""
        load_flat_parameters(self._model, torch.from_numpy(np.ascontiguousarray(params, np.float32)))
        return evaluate(self._model, self._val_batches)
