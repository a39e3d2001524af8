"""The command line: options, clear errors, and the status table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.cli import format_status, serve_parser, trainer_parser
from tests.conftest import ROOT


def python_m_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_serve_help_lists_every_documented_option():
    text = serve_parser().format_help()
    for option in ("--host", "--port", "--data-dir", "--model", "--inner-steps", "--rounds", "--deadline-seconds",
                   "--ice-host", "--data"):
        assert option in text


def test_serve_defaults_match_the_readme():
    args = serve_parser().parse_args([])
    assert (args.host, args.port, str(args.data_dir), args.model) == ("127.0.0.1", 8000, "swarmgrad-data", "tiny")
    assert args.rounds == 0


def test_trainer_options_parse():
    args = trainer_parser().parse_args(["--coordinator", "http://127.0.0.1:1", "--device", "cpu", "--max-rounds", "3"])
    assert (args.device, args.max_rounds, args.transport) == ("cpu", 3, "auto")


def test_a_missing_corpus_is_a_clear_error(tmp_path):
    result = python_m_server("--data", str(tmp_path / "nope.txt"), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_status_of_an_unreachable_coordinator_is_a_clear_error():
    result = python_m_server("status", "--coordinator", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_a_bad_coordinator_url_is_a_clear_error():
    result = python_m_server("trainer", "--coordinator", "127.0.0.1:8000")
    assert result.returncode == 2
    assert "http" in result.stderr


def test_status_command_prints_the_table_and_json_of_a_live_coordinator(processes):
    coordinator = processes.coordinator()
    coordinator.wait_ready()
    table = python_m_server("status", "--coordinator", coordinator.url)
    assert table.returncode == 0, table.stderr
    assert "model tiny (136,960 parameters)" in table.stdout
    assert "0 round(s) completed" in table.stdout
    raw = python_m_server("status", "--coordinator", coordinator.url, "--json")
    status = json.loads(raw.stdout)
    assert set(status) >= {"round", "val_loss", "history", "nodes", "job"}
    assert status["job"]["params"] == 136960 and status["round"] == 0


def test_format_status_shows_each_round_and_node():
    status = {"job": {"model": "tiny", "params": 10, "inner_steps": 5, "aggregator": "mean", "codec": "fp32"},
              "val_loss": 2.5, "round": 1, "state": "training",
              "history": [{"round": 0, "val_loss": 5.5, "accepted": 0, "rejected": 0, "tokens": 0},
                          {"round": 1, "val_loss": 2.5, "accepted": 2, "rejected": 1, "tokens": 2048}],
              "nodes": [{"id": "ab" * 32, "kind": "trainer", "state": "training", "path": "webrtc",
                         "updates_accepted": 1, "tokens_per_second": 1234.4, "reputation": 10,
                         "balance": 2_500_000, "utilisation": 0.875, "peers": 3}]}
    lines = format_status(status).splitlines()
    assert any(line.split() == ["1", "2.5000", "2", "1", "2,048"] for line in lines)
    assert any(line.split()[1:] == ["trainer", "training", "webrtc", "1", "1,234", "88%", "3", "10", "2.500000"]
               for line in lines)


def test_trainer_name_and_team_parse_and_a_bad_one_is_refused(capsys):
    args = trainer_parser().parse_args(["--coordinator", "http://h:1", "--name", "Ada's GPU", "--team", "Lab 7"])
    assert (args.name, args.team) == ("Ada's GPU", "Lab 7")
    assert trainer_parser().parse_args(["--coordinator", "http://h:1"]).name == ""
    for bad in ("x" * 41, "tab\there", " padded"):
        with pytest.raises(SystemExit):
            trainer_parser().parse_args(["--coordinator", "http://h:1", "--name", bad])
    assert "--name: " in capsys.readouterr().err
