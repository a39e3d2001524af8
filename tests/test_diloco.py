"""The outer Nesterov step: shared's reference and the coordinator's torch version both equal torch.optim.SGD."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.coordinator.strategy import outer_nesterov_step
from shared.diloco import OuterNesterov, pseudo_gradient


def sgd_reference(params, grads, lr, momentum):
    p = torch.nn.Parameter(torch.tensor(params, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=True)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().clone())
    return out


vectors = st.integers(1, 12).flatmap(
    lambda d: st.tuples(*[st.lists(st.floats(-10, 10), min_size=d, max_size=d) for _ in range(4)]))


@given(vectors, st.floats(0.05, 1.0), st.floats(0.01, 0.99))  # torch needs momentum > 0 for nesterov
@settings(max_examples=60, deadline=None)
def test_reference_outer_step_equals_torch_sgd_nesterov(vs, lr, momentum):
    params, grads = vs[0], vs[1:]
    expected = sgd_reference(params, grads, lr, momentum)
    opt = OuterNesterov(lr, momentum)
    buf = None
    for g, want in zip(grads, expected):
        params, buf = opt.step(params, g, buf)
        assert torch.allclose(torch.tensor(params, dtype=torch.float64), want, atol=1e-9)


@given(vectors)
@settings(max_examples=40, deadline=None)
def test_coordinator_outer_step_equals_torch_sgd_nesterov(vs):
    params, grads = vs[0], vs[1:]
    expected = sgd_reference(params, grads, 0.7, 0.9)
    p, buf = torch.tensor(params, dtype=torch.float64), None
    for g, want in zip(grads, expected):
        p, buf = outer_nesterov_step(p, torch.tensor(g, dtype=torch.float64), buf, 0.7, 0.9)
        assert torch.allclose(p, want, atol=1e-9)


def test_pseudo_gradient_is_global_minus_local():
    assert list(pseudo_gradient([1.0, 2.0, 3.0], [0.5, 2.0, 4.0])) == [0.5, 0.0, -1.0]


def test_outer_step_with_zero_momentum_is_plain_sgd():
    params, buf = OuterNesterov(lr=0.5, momentum=0.0).step([1.0, -1.0], [2.0, 4.0], None)
    assert params == [0.0, -3.0]
