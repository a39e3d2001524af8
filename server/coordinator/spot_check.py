"""Spot checks: re-execute a node's update from the round's start and judge the update it claimed against it.

An update is a function of (theta_r, shard, batch seed, H, batch, seq, lr, weight decay) alone (shared/batches.py,
server/training.py), so the coordinator can recompute it. Never slash on a measure that an honest node can fail:
every tolerance below cites the honest disagreement it was set against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from server.model import GPT, flat_parameters, load_flat_parameters
from server.training import inner_steps, token_tensor
from shared.batches import ScheduleError, batch_seed, batch_starts
from shared.model import GPTConfig, num_parameters
from shared.tokens import TokenError


class SpotCheckError(ValueError):
    """The update cannot be re-executed or judged as asked (wrong sizes, unknown codec); nothing was judged."""


@dataclass(frozen=True)
class Verdict:
    """The judgement of one update: `ok` False means the claimed update is not the one its assignment computes.

    `cosine` and `relative_error` (||claimed - recomputed|| / ||recomputed||) are over the compared coordinates;
    `evidence` holds what a later reader needs to check the decision (the measures, the thresholds, the codec).
    """

    ok: bool
    cosine: float
    relative_error: float
    evidence: dict = field(default_factory=dict)


def reexecute(cfg: GPTConfig, params_fp32: np.ndarray, shard: bytes, node_id: str, round_: int, steps: int,
              batch_size: int, seq_len: int, lr: float, weight_decay: float, device: str = "cpu") -> np.ndarray:
    """The pseudo-gradient theta_r - theta_local that node `node_id` computes in round `round_`: `steps` AdamW
    steps from a fresh optimizer on `shard`, with the batches of shared.batches for that node and round, from the
    round's start parameters `params_fp32` (flat float32, shared.model layout). Runs on torch `device`.
    """
    params = np.ascontiguousarray(params_fp32, dtype=np.float32).reshape(-1)
    if params.size != num_parameters(cfg):
        raise SpotCheckError(f"{params.size} parameters given, the model has {num_parameters(cfg)}")
    if steps < 1 or batch_size < 1 or not 0 < seq_len <= cfg.block_size:
        raise SpotCheckError(f"steps {steps} and batch {batch_size} must be >= 1, seq_len {seq_len} in "
                             f"1..{cfg.block_size}")
    start = torch.from_numpy(params.copy())
    model = GPT(cfg).to(device)
    load_flat_parameters(model, start)
    try:
        data = token_tensor(shard, cfg.vocab_size)
        schedule = batch_starts(data.numel(), steps, batch_size, seq_len, batch_seed(node_id, round_))
    except (ScheduleError, TokenError) as e:
        raise SpotCheckError(str(e)) from None
    inner_steps(model, data, schedule, seq_len, lr, weight_decay)
    return (start - flat_parameters(model)).numpy()


@dataclass(frozen=True)
class Tolerance:
    """How far an honest claimed update may sit from the re-executed one: in direction, cosine at least
    `min_cosine`; in size, ||claimed|| / ||recomputed|| within 1 +- `max_norm_deviation`."""

    min_cosine: float
    max_norm_deviation: float


# Honest disagreement, measured on the tiny model (lr 3e-3, H in {1, 5, 20}, batch 2 and 16, weight decay 0 and 0.1,
# from the initial model and after 300, 1500 and 6000 steps): the WGSL trainer (the browser's batches, on lavapipe),
# torch in float64 and torch on one thread, against this re-execution (torch CPU, two threads), reach cosine 0.99986
# at worst (relative error 0.017) and a norm ratio within 1 +- 0.00008. The disagreement is Adam's g / sqrt(v) at
# gradients near zero, where float32 rounding flips a few coordinates (0.09% move by more than lr / 10, by up to
# 10 lr): it turns the direction a little and keeps the size. It grows as the model trains (1 - cosine: 1e-8 at
# init, 2e-5 after 300 steps, 4e-5 after 1500, 1.5e-4 after 6000), hence a wide margin on the direction: 1 - cosine
# may be 70 times the worst measured. The nearest fabrications sit far outside: another node's update or another
# shard's (cosine <= 0.81), the honest one with H halved (cosine <= 0.953, norm ratio 0.63-0.69), the honest one
# scaled (norm ratio = the scale; 0.95 and 1.05 already fail).
# The codecs add little: int8 its rounding (relative error <= 0.0077 at a block of 256 or 2^20) and the previous
# round's error-feedback residual riding along (0.0055 of the update's norm), fp16 0.0002, i.e. below 1e-4 in
# 1 - cosine and 0.006 in norm; so one tolerance serves them all.
TOLERANCE = Tolerance(min_cosine=0.99, max_norm_deviation=0.05)
TOLERANCES = {"fp32": TOLERANCE, "fp16": TOLERANCE, "int8": TOLERANCE}
# top-k is not spot-checked. Its values carry the error-feedback residual of every earlier round, which the
# coordinator does not know and which outgrows the update itself (1.5x the update's norm after 2 rounds, 3.7x after
# 12, 4 workers at H = 20). On the transmitted support an honest update keeps cosine >= 0.92 with the re-execution,
# but another node's update of the same round reaches 0.98 and one with H halved 0.999, and the honest norm ratio on
# the support drifts from 1 to 6.2: neither a copied nor a scaled update can be told from an honest one.
# sparseloco is top-k per chunk with error feedback too (and its 2-bit values add their quantisation error to it).
NOT_CHECKED = {name: "the error-feedback residual on the transmitted support is unknown to the coordinator and as "
                     "large as the update itself, so no tolerance tells an honest update from a copied or scaled one"
               for name in ("topk", "sparseloco")}


def _norm(values: np.ndarray) -> float:
    return float(np.sqrt(np.dot(values, values)))


def _measures(claimed: np.ndarray, recomputed: np.ndarray) -> tuple[float, float, float]:
    """(cosine, relative error, norm ratio) in float64; every one finite. A zero vector has cosine 1 with zero and 0
    with anything else; against a zero re-execution (lr 0) a non-zero claim has relative error and norm ratio 1."""
    norm_c, norm_r = _norm(claimed), _norm(recomputed)
    if norm_r == 0.0:
        return (1.0, 0.0, 1.0) if norm_c == 0.0 else (0.0, 1.0, 1.0)
    cosine = float(np.dot(claimed, recomputed) / (norm_c * norm_r)) if norm_c > 0.0 else 0.0
    return cosine, _norm(claimed - recomputed) / norm_r, norm_c / norm_r


def judge(claimed: np.ndarray, recomputed: np.ndarray, codec: dict) -> Verdict:
    """Does the update a node claimed (decoded from its payload) match the re-executed one, under `codec` (the
    Update's codec spec, {"name", "params"})? A failed verdict's evidence["reason"] says which bound broke.

    top-k and sparseloco updates are not judged (ok, evidence["skipped"] == the codec; see NOT_CHECKED); their
    cosine and relative error are measured on the transmitted support, for the record. Evidence holds JSON numbers only.
    """
    name = codec.get("name") if isinstance(codec, dict) else None
    if name not in TOLERANCES and name not in NOT_CHECKED:
        raise SpotCheckError(f"no spot-check rule for codec {codec!r}; known: {', '.join([*TOLERANCES, *NOT_CHECKED])}")
    c = np.asarray(claimed, dtype=np.float64).reshape(-1)
    r = np.asarray(recomputed, dtype=np.float64).reshape(-1)
    if c.size != r.size:
        raise SpotCheckError(f"the claimed update has {c.size} values, the re-executed one {r.size}")
    if not np.isfinite(r).all():
        raise SpotCheckError("the re-executed update is not finite; it cannot be the measure of a claim")
    evidence: dict = {"codec": name, "values": int(c.size)}
    if not np.isfinite(c).all():
        return Verdict(False, 0.0, float("inf"), {**evidence, "reason": "the claimed update is not finite"})
    if name in NOT_CHECKED:
        support = np.flatnonzero(c)
        cosine, relative_error, _ = _measures(c[support], r[support])
        return Verdict(True, cosine, relative_error,
                       {**evidence, "skipped": name, "reason": NOT_CHECKED[name], "support": int(support.size),
                        "cosine_on_support": cosine, "relative_error_on_support": relative_error})
    tolerance = TOLERANCES[name]
    cosine, relative_error, norm_ratio = _measures(c, r)
    evidence.update(cosine=cosine, relative_error=relative_error, norm_ratio=norm_ratio, norm_claimed=_norm(c),
                    norm_recomputed=_norm(r), min_cosine=tolerance.min_cosine,
                    max_norm_deviation=tolerance.max_norm_deviation)
    broken = []
    if not cosine >= tolerance.min_cosine:
        broken.append(f"cosine {cosine:.6f} < {tolerance.min_cosine}")
    if not abs(norm_ratio - 1.0) <= tolerance.max_norm_deviation:
        broken.append(f"norm ratio {norm_ratio:.6f} outside 1 +- {tolerance.max_norm_deviation}")
    if broken:
        evidence["reason"] = "; ".join(broken)
    return Verdict(not broken, cosine, relative_error, evidence)
