"""The simulator's attacks: what a Byzantine worker sends instead of its honest pseudo-gradient. They enter the
real node at one hook, the simulated port's encode (server/sim/worker.py).
"""

from __future__ import annotations

from statistics import NormalDist

import torch

ATTACKS = ("signflip", "noise", "scale", "alie")
SCALE_ATTACK_FACTOR = 100.0  # how much the "scale" attacker blows up its honest update


class AttackError(ValueError):
    """An unknown attack was asked for."""


# each ALIE attacker's own perturbation, relative to the forged vector's norm: two attackers then agree to a
# cosine of about 1 / (1 + 0.2^2) = 0.96, under the copy threshold of 0.99
ALIE_PERTURBATION = 0.2


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019 ("A little is enough"), the largest z that keeps the attackers inside the honest
    spread: s = floor(n/2 + 1) - f supporters are needed, z = Phi^-1((n - s) / n)."""
    s = max(1, n // 2 + 1 - f)
    return NormalDist().inv_cdf((n - s) / n)


def corrupt(attack: str, honest: list[torch.Tensor], byzantine: list[int], gen: torch.Generator,
            scale_factor: float = SCALE_ATTACK_FACTOR) -> dict[int, torch.Tensor]:
    """What each attacker in `byzantine` (indices into `honest`) sends instead of its honest update.

    signflip: -g (the honest norm). noise: a Gaussian direction at the honest norm. scale: g x scale_factor.
    alie: every attacker sends mean - z * std of the round's honest updates, coordinate-wise (the colluders
    are omniscient: Baruch et al.'s strongest setting), each with its own small Gaussian perturbation: identical
    vectors would be refused as copies of one another (server/coordinator/copies.py) before any aggregation rule saw them.
    """
    if attack == "alie":
        stacked = torch.stack(honest).double()
        forged = (stacked.mean(0) - alie_z(len(honest), len(byzantine)) * stacked.std(0, unbiased=False)).float()
        out = {}
        for i in byzantine:
            noise = torch.randn(forged.shape, generator=gen)
            out[i] = forged + noise * (ALIE_PERTURBATION * forged.norm() / noise.norm().clamp_min(1e-30))
        return out
    out = {}
    for i in byzantine:
        g = honest[i]
        if attack == "signflip":
            out[i] = -g
        elif attack == "noise":
            noise = torch.randn(g.shape, generator=gen)
            out[i] = noise * (g.norm() / noise.norm().clamp_min(1e-30))
        elif attack == "scale":
            out[i] = g * scale_factor
        else:
            raise AttackError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    return out
