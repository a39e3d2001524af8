"""A real coordinator process, spoken to by a hand-driven client over the WebSocket path: bad input gets typed
errors, and a rejected update changes nothing, on SQLite and on PostgreSQL (the `store_url` fixture)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from server.keys import NodeKey
from shared.diloco import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM
from shared.identity import signing_bytes
from shared.wire import (Challenge, Error, Hello, ModelRequest, PathSelect, PayloadAssembler, PayloadHeader,
                         RoundOpen, Update, UpdateResult, Welcome, decode_message, payload_frames)


class Client:
    """The protocol by hand: only shared/ and a key, so each step can be bent out of shape."""

    def __init__(self, ws, key: NodeKey):
        self.ws, self.key = ws, key
        self.assembler = PayloadAssembler()

    @classmethod
    async def join(cls, url: str, key: NodeKey | None = None) -> "Client":
        ws = await websockets.connect(url.replace("http", "ws") + "/ws", max_size=1 << 20)
        client = cls(ws, key or NodeKey())
        challenge = decode_message(await ws.recv())
        assert isinstance(challenge, Challenge)
        client.coordinator_id = challenge.coordinator_id
        hello = Hello(client.key.node_id, "trainer", challenge.nonce, "0" * 128, "test client")
        hello = Hello(**{**hello.__dict__, "signature": client.key.sign(signing_bytes("hello", hello.signing_fields()))})
        await ws.send(hello.encode())
        assert isinstance(decode_message(await ws.recv()), Welcome)
        await ws.send(PathSelect("websocket").encode())
        return client

    async def receive(self, kind, timeout: float = 30):
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(frame, bytes):
                done = self.assembler.add_chunk(frame)
                if done is not None and kind is tuple:
                    return done
                continue
            msg = decode_message(frame)
            if isinstance(msg, PayloadHeader):
                self.assembler.begin(msg)
            elif isinstance(msg, kind):
                return msg

    async def model(self, assignment: RoundOpen) -> np.ndarray:
        await self.ws.send(ModelRequest(assignment.round, assignment.model_hash).encode())
        header, data = await self.receive(tuple)
        assert header.sha256 == assignment.model_hash
        return np.frombuffer(data, "<f4")

    def signed_update(self, assignment: RoundOpen, header: PayloadHeader, num_values: int,
                      signer: NodeKey | None = None, tokens: int | None = None) -> Update:
        if tokens is None:
            tokens = int(assignment.config["seq_len"])  # one step of one sequence: within any assignment
        u = Update(self.key.node_id, assignment.round, assignment.model_hash, tokens, 1, 3.0, 2.0,
                   {"name": "fp32", "params": {}}, num_values, header.transfer_id, header.sha256,
                   header.total_bytes, "0" * 128)
        return Update(**{**u.__dict__, "signature": (signer or self.key).sign(signing_bytes("update",
                                                                                          u.signing_fields()))})

    async def send_update(self, assignment: RoundOpen, values: np.ndarray, signer: NodeKey | None = None,
                          num_values: int | None = None, tokens: int | None = None) -> UpdateResult:
        data = np.ascontiguousarray(values, "<f4").tobytes()
        header, chunks = payload_frames(1, "update", data)
        await self.ws.send(self.signed_update(assignment, header, num_values or values.size, signer, tokens).encode())
        await self.ws.send(header.encode())
        for c in chunks:
            await self.ws.send(c)
        return await self.receive(UpdateResult)

    async def announce_update(self, assignment: RoundOpen, size: int = 136_960) -> None:
        """A signed Update whose payload never follows."""
        header, _ = payload_frames(7, "update", np.zeros(size, "<f4").tobytes())
        await self.ws.send(self.signed_update(assignment, header, size).encode())


async def honest_update(coordinator, client: Client, assignment: RoundOpen, params: np.ndarray) -> np.ndarray:
    """The pseudo-gradient the assignment computes for this client: one AdamW step on one sequence of its shard,
    as a trainer computes it (what a spot check re-executes)."""
    import urllib.request

    from server.coordinator.spot_check import reexecute
    from shared.model import model_config

    with urllib.request.urlopen(f"{coordinator.url}/api/shards/{assignment.shard}", timeout=10) as r:
        shard = r.read()
    cfg = assignment.config
    return reexecute(model_config("tiny"), params, shard, client.key.node_id, assignment.round, 1, 1,
                     int(cfg["seq_len"]), float(cfg["lr"]), float(cfg["weight_decay"]))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture
def coordinator(processes, store_url):
    # these clients send made-up values, which a spot check would rightly find fake: none is re-executed here
    c = processes.coordinator("--deadline-seconds", "600", "--verify-share", "0", store=store_url)
    c.wait_ready()
    return c


def test_a_hello_signed_by_another_key_is_refused(coordinator):
    async def scenario():
        async with websockets.connect(coordinator.url.replace("http", "ws") + "/ws") as ws:
            challenge = decode_message(await ws.recv())
            claimed, signer = NodeKey(), NodeKey()
            hello = Hello(claimed.node_id, "trainer", challenge.nonce, "0" * 128)
            hello = Hello(**{**hello.__dict__, "signature": signer.sign(signing_bytes("hello", hello.signing_fields()))})
            await ws.send(hello.encode())
            return decode_message(await ws.recv())

    error = run(scenario())
    assert isinstance(error, Error) and error.code == "auth" and error.fatal
    assert coordinator.status()["nodes"] == []


def test_a_malformed_frame_gets_a_typed_error_and_closes_the_socket(coordinator):
    async def scenario():
        client = await Client.join(coordinator.url)
        await client.receive(RoundOpen)
        await client.ws.send(json.dumps({"v": 1, "type": "update", "round": "three"}))
        error = await client.receive(Error)
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), 10)
        return error

    error = run(scenario())
    assert error.code == "bad_field" and "update" in error.message


@pytest.mark.parametrize("bend, rule, booked", [
    ("nan", "finite-values", 1),
    ("huge", "norm-bound", 1),
    ("short", "shape", 1),
    ("forged", "signature", 0),  # not the node's own signed statement: answered, never booked against it
])
def test_a_bad_update_is_rejected_with_its_rule_and_changes_nothing(coordinator, bend, rule, booked):
    async def scenario():
        client = await Client.join(coordinator.url)
        assignment = await client.receive(RoundOpen)
        params = await client.model(assignment)
        values = np.full(params.size, 1e-3, np.float32)
        if bend == "nan":
            values[123] = np.nan
            verdict = await client.send_update(assignment, values)
        elif bend == "huge":
            verdict = await client.send_update(assignment, values * 1e9)
        elif bend == "short":
            verdict = await client.send_update(assignment, values[:-1])
        else:
            verdict = await client.send_update(assignment, values, signer=NodeKey())
            await client.ws.close()  # an unsigned update does not use up the node's turn: it leaves instead
        before = coordinator.status()
        # the rejection used up this node's turn (or it left); a second node's good update alone closes the round
        other = await Client.join(coordinator.url)
        second = await other.receive(RoundOpen)
        good = await other.send_update(second, np.full(params.size, 1e-3, np.float32))
        next_round = await other.receive(RoundOpen)
        return verdict, before, good, params, await other.model(next_round)

    verdict, before, good, params, new_params = run(scenario())
    assert verdict.accepted is False and rule in verdict.rule.split(",")
    assert before["round"] == 0 and before["model_hash"] == before["history"][0]["model_hash"]
    assert good.accepted is True
    # outer Nesterov's first step on the good update alone: theta - lr * (1 + momentum) * g
    step = DEFAULT_OUTER_LR * (1 + DEFAULT_OUTER_MOMENTUM) * 1e-3
    np.testing.assert_allclose(new_params, params - step, atol=1e-6)
    after = coordinator.wait_for(lambda s: s["round"] >= 1, 60, "round 1 committed")  # (it may settle behind)
    assert after["history"][1]["accepted"] == 1 and after["history"][1]["rejected"] == booked


def test_a_late_update_counts_once_at_half_weight_and_an_older_one_is_dropped(processes, store_url):
    coordinator = processes.coordinator("--deadline-seconds", "5", "--verify-share", "0", store=store_url)
    coordinator.wait_ready()

    async def scenario():
        slow, fast = await Client.join(coordinator.url), await Client.join(coordinator.url)
        first = await slow.receive(RoundOpen)
        params = await slow.model(first)
        await fast.receive(RoundOpen)  # round 0 is assigned to both and waits for both, until its deadline
        good = np.full(params.size, 1e-3, np.float32)
        assert (await fast.send_update(first, good)).accepted
        second = await fast.receive(RoundOpen)  # the deadline closed round 0 without the slow node
        late = await slow.send_update(first, good)  # computed on round 0's model, arriving in round 1
        # slow was assigned round 1 too (same round and model as `second`) and leaves it undone
        third = await fast.receive(RoundOpen)  # round 1 closed at its deadline with the late update
        assert (await fast.send_update(third, good * 2)).accepted
        while (await slow.receive(RoundOpen)).round < 3:  # round 2 closes at its deadline: round 3 opens
            pass
        too_late = await slow.send_update(second, good)  # round 1's model, now two rounds old
        replayed = await slow.send_update(first, good)  # its round-0 update, heard once already
        return first, second, late, too_late, replayed

    first, second, late, too_late, replayed = run(scenario())
    coordinator.wait_for(lambda s: s["round"] >= 3, 60, "round 3 committed")  # it may settle behind round 4's opening
    assert second.round == first.round + 1
    assert late.accepted
    assert not too_late.accepted and too_late.rule == "max-staleness"
    assert not replayed.accepted and replayed.rule == "replay"
    with coordinator.read_store() as books:
        rows = [(u.round, u.accepted, u.weight) for u in books.updates()]
    # the late one is booked with round 1, at half weight (the stale one waits for round 3's commit)
    assert rows == [(0, 1, 1.0), (0, 1, 0.5), (2, 1, 1.0)]
