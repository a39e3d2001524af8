"""DiLoCo's round math as reference: the pseudo-gradient and the outer Nesterov step.

Plain Python over sequences of floats, so every peer can check it; the coordinator runs the same math with
torch (server/coordinator/strategy.py, outer_nesterov_step) and a test proves the two agree with torch.optim.SGD(nesterov=True).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_OUTER_LR = 0.7
# 0.9 bounced at small H and ended 4.7% above the best outer step on average; 0.5 was within 0.7% (bench/README.md,
# "The outer step"). A new job's default only: a running job keeps its governed value.
DEFAULT_OUTER_MOMENTUM = 0.5


def pseudo_gradient(global_params: Sequence[float], local_params: Sequence[float]) -> array:
    """theta_global - theta_local: the direction the outer optimizer descends along."""
    if len(global_params) != len(local_params):
        raise ValueError(f"length mismatch: {len(global_params)} global vs {len(local_params)} local")
    return array("f", (g - l for g, l in zip(global_params, local_params)))


@dataclass
class OuterNesterov:
    """SGD with Nesterov momentum on pseudo-gradients, exactly as torch.optim.SGD(nesterov=True, dampening=0):

        buf = momentum * buf + g        (buf = g on the first step)
        theta = theta - lr * (g + momentum * buf)
    """

    lr: float = DEFAULT_OUTER_LR
    momentum: float = DEFAULT_OUTER_MOMENTUM

    def step(self, params: Sequence[float], grad: Sequence[float], buf: Sequence[float] | None) -> tuple[list, list]:
        """One outer step; returns (new params, new momentum buffer). `buf` is None before the first step."""
        if len(params) != len(grad):
            raise ValueError(f"length mismatch: {len(params)} params vs {len(grad)} gradient")
        if buf is None:
            new_buf = [float(g) for g in grad]
        else:
            if len(buf) != len(grad):
                raise ValueError(f"momentum buffer has {len(buf)} values, gradient {len(grad)}")
            new_buf = [self.momentum * b + g for b, g in zip(buf, grad)]
        new_params = [p - self.lr * (g + self.momentum * b) for p, g, b in zip(params, grad, new_buf)]
        return new_params, new_buf
