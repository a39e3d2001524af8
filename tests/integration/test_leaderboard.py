"""Identity and the leaderboard, against a real coordinator process: a trainer's signed --name and --team reach
/api/status and /api/leaderboard (JSON and the CSV export), and a hello whose name is not its signer's, or not a
name at all, is refused with a typed error. The ranking, which the store counts, on SQLite and on PostgreSQL (the
`store_url` fixture)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import urllib.error
import urllib.request

import pytest
import websockets

from server.coordinator.leaderboard import NODE_COLUMNS, TEAM_COLUMNS
from server.keys import NodeKey
from shared.identity import signing_bytes
from shared.wire import Error, Hello, decode_message

NAME, TEAM = 'Ada\'s GPU, "one"', "Lab 7"  # a comma and quotes: the CSV must quote them (RFC 4180)


def fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_a_named_trainer_is_ranked_in_the_json_and_the_csv_export(processes, loopback_namespace, tmp_path,
                                                                   store_url):
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "600",
                                        "--rounds", "1", "--verify-share", "0", store=store_url)
    coordinator.wait_ready()
    key_file = tmp_path / "trainer.key"
    trainer = processes.trainer(coordinator.url, "--key-file", str(key_file), "--max-rounds", "1",
                                "--name", NAME, "--team", TEAM)
    assert trainer.wait(240) == 0, trainer.output()
    node = NodeKey.load_or_create(key_file).node_id
    status = coordinator.wait_for(lambda s: s["state"] == "finished", 60, "the job's one round")
    (row,) = [n for n in status["nodes"] if n["id"] == node]
    assert (row["name"], row["team"], row["updates_accepted"]) == (NAME, TEAM, 1)

    board = coordinator.status_of("/api/leaderboard")
    (entry,) = board["nodes"]
    assert entry == {"rank": 1, "id": node, "name": NAME, "team": TEAM, "kind": "trainer",
                     "credits_micro": row["balance"], "accepted_updates": 1, "tokens": row["tokens"], "rounds": 1,
                     "last_seen": row["last_seen"]}
    assert entry["credits_micro"] > 0 and entry["tokens"] > 0
    (team,) = board["teams"]
    assert team == {"rank": 1, "team": TEAM, "members": 1, "credits_micro": row["balance"], "accepted_updates": 1,
                    "tokens": row["tokens"], "rounds": 1, "last_seen": row["last_seen"]}

    media, text = fetch(coordinator.url + "/api/leaderboard?format=csv")
    assert media.startswith("text/csv")
    lines = text.split("\r\n")
    assert lines[0] == ",".join(NODE_COLUMNS) and lines[-1] == ""
    assert lines[1].startswith(f'1,{node},"Ada\'s GPU, ""one""",Lab 7,trainer,')  # quotes doubled, field quoted
    (parsed,) = list(csv.DictReader(io.StringIO(text)))
    credits = f"{row['balance'] // 1_000_000}.{row['balance'] % 1_000_000:06d}"
    assert {k: parsed[k] for k in ("name", "team", "credits", "accepted_updates", "rounds")} == {
        "name": NAME, "team": TEAM, "credits": credits, "accepted_updates": "1", "rounds": "1"}
    assert parsed["last_seen"].endswith("Z") and len(parsed["last_seen"]) == 20

    _, teams = fetch(coordinator.url + "/api/leaderboard?format=csv&table=teams")
    assert teams.split("\r\n")[:2] == [",".join(TEAM_COLUMNS),
                                       f"1,{TEAM},1,{credits},1,{row['tokens']},1,{parsed['last_seen']}"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(coordinator.url + "/api/leaderboard?format=xml")
    assert refused.value.code == 400 and json.load(refused.value)["code"] == "bad_query"


@pytest.fixture
def coordinator(processes):
    c = processes.coordinator("--deadline-seconds", "600", "--verify-share", "0")
    c.wait_ready()
    return c


def hello_answer(coordinator, sign_then: dict, extra: dict | None = None) -> Error:
    """Sign a hello, change `sign_then` in it, send it with `extra` fields set in its JSON; the answer."""

    async def scenario():
        async with websockets.connect(coordinator.url.replace("http", "ws") + "/ws") as ws:
            challenge = decode_message(await ws.recv())
            key = NodeKey()
            hello = Hello(key.node_id, "trainer", challenge.nonce, "0" * 128, name="Ada", team="Lab 7")
            hello = Hello(**{**hello.__dict__, "signature": key.sign(signing_bytes("hello", hello.signing_fields()))})
            await ws.send(json.dumps({**hello.to_dict(), **sign_then, **(extra or {})}))
            return decode_message(await ws.recv())

    return asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("changed", [{"name": "Mallory"}, {"team": "Other team"}, {"name": ""}])
def test_a_hello_whose_name_or_team_changed_after_signing_is_refused(coordinator, changed):
    error = hello_answer(coordinator, changed)
    assert isinstance(error, Error) and (error.code, error.fatal) == ("auth", True)
    assert coordinator.status()["nodes"] == []


def test_a_hello_with_a_name_that_is_not_printable_text_is_refused_with_a_typed_error(coordinator):
    error = hello_answer(coordinator, {}, {"name": "two\nlines"})
    assert isinstance(error, Error) and error.code == "bad_field" and "name must be printable" in error.message
    assert coordinator.status()["nodes"] == []
