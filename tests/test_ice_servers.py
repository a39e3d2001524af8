"""STUN/TURN server settings: the URLs the coordinator accepts, the job's RTCIceServer list, and its option errors."""

from __future__ import annotations

import pytest

from server.cli import parse_serve_args
from server.net import rtc


@pytest.mark.parametrize("url", ["stun:stun.example.org", "stun:192.0.2.1:3478", "turn:turn.example.org",
                                 "turn:turn.example.org:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp",
                                 "turns:turn.example.org:443?transport=tcp", "turns:turn.example.org"])
def test_stun_turn_and_turns_urls_are_accepted_as_written(url):
    assert rtc.parse_ice_url(url) == url


@pytest.mark.parametrize("url, why", [
    ("http://turn.example.org", "not an ICE server URL"),
    ("turn:user:pass@turn.example.org", "no user or password in the URL"),
    ("turn:[::1]:3478", "not an ICE server URL"),
    ("turn:turn.example.org:70000", "not in 1..65535"),
    ("turn:turn.example.org?transport=sctp", "transport=udp or tcp"),
    ("turns:turn.example.org?transport=udp", "transport=tcp"),
    ("stun:stun.example.org?transport=udp", "no transport"),
    ("stun:" + "a" * 600, "at most 512 characters"),
])
def test_a_bad_url_says_what_is_wrong(url, why):
    with pytest.raises(ValueError, match=why.replace("?", r"\?").replace(".", r"\.")):
        rtc.parse_ice_url(url)


def test_the_job_list_puts_stun_apart_and_gives_every_turn_url_the_credentials():
    servers = rtc.ice_server_list(["stun:s.example.org", "turn:t.example.org?transport=udp",
                                   "turns:t.example.org:443?transport=tcp", "stun:s.example.org"], "user", "pass")
    assert servers == [{"urls": ["stun:s.example.org"]},
                       {"urls": ["turn:t.example.org?transport=udp", "turns:t.example.org:443?transport=tcp"],
                        "username": "user", "credential": "pass"}]
    assert rtc.ice_server_list([]) == []


def test_turn_needs_credentials_and_credentials_need_turn():
    with pytest.raises(ValueError, match="needs a username and a password"):
        rtc.ice_server_list(["turn:t.example.org"], "user", None)
    with pytest.raises(ValueError, match="no turn: or turns: server"):
        rtc.ice_server_list(["stun:s.example.org"], "user", "pass")


def test_a_node_reads_the_jobs_list_as_aiortc_ice_servers():
    (stun, turn) = rtc.rtc_ice_servers([{"urls": "stun:s.example.org"},
                                        {"urls": ["turn:t.example.org"], "username": "u", "credential": "p"}])
    assert (stun.urls, stun.username, stun.credential) == (["stun:s.example.org"], None, None)
    assert (turn.urls, turn.username, turn.credential) == (["turn:t.example.org"], "u", "p")
    assert rtc.rtc_ice_servers(None) == () and rtc.rtc_ice_servers([]) == ()
    for bad in ({"urls": []}, [{"urls": ["ftp://x"]}], [{"urls": ["stun:x"], "username": 5}], ["stun:x"]):
        with pytest.raises(ValueError):
            rtc.rtc_ice_servers(bad)


def test_coordinator_options_build_the_list_and_read_the_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("SWARMGRAD_TURN_PASSWORD", "from-env")
    args = parse_serve_args(["--ice-server", "turn:t.example.org", "--turn-username", "u"])
    assert args.ice_servers == [{"urls": ["turn:t.example.org"], "username": "u", "credential": "from-env"}]
    assert parse_serve_args(["--ice-server", "stun:s.example.org"]).ice_servers == [{"urls": ["stun:s.example.org"]}]
    assert parse_serve_args([]).ice_servers == []  # no server unless named, whatever the environment holds


@pytest.mark.parametrize("argv, message", [
    (["--ice-server", "turn:t.example.org"], "needs a username and a password"),
    (["--ice-server", "stun:s.example.org", "--turn-username", "u"], "no turn: or turns: server"),
    (["--ice-server", "turn:user:pass@t.example.org"], "argument --ice-server: 'turn:user:pass@t.example.org' is "
                                                       "not an ICE server URL"),
])
def test_bad_ice_options_are_argparse_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("SWARMGRAD_TURN_PASSWORD", raising=False)
    with pytest.raises(SystemExit) as exit_:
        parse_serve_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
