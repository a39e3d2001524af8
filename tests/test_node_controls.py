"""shared/node.py's user controls, against the scripted coordinator of test_node.py: pause between inner steps (the
coordinator is told, the round goes on after resume or is dropped when it closed meanwhile), finish this round and
leave, and the GPU share's rests, kept out of the compute time the node reports.

The port is the torch trainer's own, with a train() that goes through the node's between-steps hook first, as the
browser's does between its groups of steps.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.node import MIN_SHARE, Ended, Node
from shared.wire import Bye, NodeState, RoundClosed, RoundStats, Update, decode_message
from tests.test_node import ScriptedCoordinator, ScriptedTorchPort, initial_model

STEP_S = 0.02  # what the port says each inner step's compute took, for the GPU share's rests


class HookedPort(ScriptedTorchPort):
    """TorchPort whose train() passes the node's between-steps hook once per inner step first."""

    def __init__(self, coordinator: ScriptedCoordinator, on_step=lambda node, work, step: None):
        super().__init__(coordinator)
        self.on_step = on_step

    async def train(self, node, work):
        for step in range(work.steps):
            self.on_step(node, work, step)
            await node.between_steps(work, STEP_S if step else 0.0)
        return await super().train(node, work)


class ListeningCoordinator(ScriptedCoordinator):
    """Keeps every message the node sent, in order, and calls `on_state(state)` on each NodeState."""

    def __init__(self, *args, on_state=lambda state: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.heard: list = []
        self.on_state = on_state

    def hear(self, frame):
        if isinstance(frame, str):
            self.heard.append(decode_message(frame))
            if isinstance(self.heard[-1], NodeState):
                self.on_state(self.heard[-1].state)
        super().hear(frame)


def run(coordinator: ScriptedCoordinator, port: HookedPort, share: float = 1.0) -> tuple[Ended, Node]:
    node = Node(port, port.key.node_id, transport="websocket")
    node.set_share(share)
    return asyncio.run(asyncio.wait_for(node.run(), 120)), node


def said(coordinator: ListeningCoordinator) -> list[str]:
    """What the node said, as message types and states, in order."""
    return [f"state:{m.state}" if isinstance(m, NodeState) else m.TYPE for m in coordinator.heard
            if isinstance(m, (NodeState, Update, Bye))]


def test_a_paused_node_sends_nothing_until_resumed_then_finishes_the_open_round():
    resumed: list[Node] = []
    coordinator = ListeningCoordinator({0: initial_model(), 1: initial_model()},
                                       on_state=lambda s: s == "paused" and resumed[0].resume())
    port = HookedPort(coordinator, on_step=lambda node, work, step: (resumed.append(node), node.pause())
                      if (work.round, step) == (0, 1) else None)
    ended, node = run(coordinator, port)
    assert ended == Ended("finished", "job finished")
    assert said(coordinator) == ["state:paused", "state:active", "update", "update"]
    assert [u.round for u, _ in coordinator.updates] == [0, 1] and node.accepted == 2


def test_a_round_that_closed_during_the_pause_is_dropped_and_the_next_one_trained():
    nodes: list[Node] = []

    def on_state(state: str) -> None:
        if state == "paused":  # the round closes without this node, as the coordinator does for a paused one
            coordinator.node.feed("signaling", RoundClosed(1, 1.0, 1, 0).encode())
            nodes[0].resume()
        elif state == "active":  # back from the pause with no assignment: it gets the open round's
            coordinator.open_round(1)

    coordinator = ListeningCoordinator({0: initial_model(), 1: initial_model()}, on_state=on_state)
    port = HookedPort(coordinator, on_step=lambda node, work, step: (nodes.append(node), node.pause())
                      if (work.round, step) == (0, 1) else None)
    ended, node = run(coordinator, port)
    assert ended.how == "finished"
    assert [u.round for u, _ in coordinator.updates] == [1]
    notices = [f["message"] for e, f in port.events if e == "notice"]
    assert any("round 1 closed while this node was paused" in m for m in notices), notices


def test_finish_sends_exactly_one_more_update_then_leaves():
    coordinator = ListeningCoordinator({0: initial_model(), 1: initial_model(), 2: initial_model()}, rounds=3)
    port = HookedPort(coordinator, on_step=lambda node, work, step: node.finish() if step == 1 else None)
    ended, node = run(coordinator, port)
    assert ended == Ended("stopped", "stopped")
    assert said(coordinator) == ["state:finishing", "update", "bye"]
    assert [u.round for u, _ in coordinator.updates] == [0]  # round 1 was opened, and not trained


def test_the_gpu_share_rests_between_steps_and_the_rests_are_not_compute_time():
    coordinator = ListeningCoordinator({0: initial_model(), 1: initial_model()})
    ended, node = run(coordinator, HookedPort(coordinator), share=0.5)
    assert ended.how == "finished"
    steps = 2  # CONFIG's inner steps: one rest, after the second step's hook
    assert node._duty_s >= (steps - 1) * STEP_S * (1 / 0.5 - 1)
    (stats,) = [m for m in coordinator.heard if isinstance(m, RoundStats) and m.round == 1]
    update0 = next(u for u, _ in coordinator.updates if u.round == 0)
    # the update's seconds are the steps' wall time (the node's speed as its share makes it); the round's compute
    # time is that less the rests
    assert stats.compute_seconds < update0.seconds
    assert update0.seconds - stats.compute_seconds >= (steps - 1) * STEP_S * 0.9


@pytest.mark.parametrize("share", [0.0, MIN_SHARE / 2, 1.5])
def test_a_gpu_share_outside_its_range_is_refused(share):
    coordinator = ListeningCoordinator({0: initial_model()})
    node = Node(HookedPort(coordinator), "ab" * 32)
    with pytest.raises(ValueError, match="GPU share"):
        node.set_share(share)
