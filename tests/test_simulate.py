"""The simulator's claims, each from real simulated runs: the real coordinator, rules, codecs and aggregators,
with workers training the tiny model on real shards. Runs are small enough for a 2-core machine.

Every comparison holds the seed fixed, so the honest workers draw the same batches in every run being compared.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from server.sim import SimOptions, SimulationError, alie_z, main, run_simulation
from shared import swarm

# Early-training setting: long enough for the clean run to fall from 5.5 to about 3.2, short enough that a
# swarm slowed by attackers has not caught up. A 3 MB corpus keeps every shard Python source (the standard
# library's unicode code-page tables start near byte 3.4M and would add a data shift to every curve).
BASE = dict(workers=9, rounds=6, inner_steps=5, batch=8, lr=1e-3, seed=0, corpus_bytes=3_000_000, out=None)
A_THIRD = 1 / 3  # 3 of 9 workers
ROBUST = ["median", "trimmed", "krum", "multikrum", "cclip"]


@pytest.fixture(scope="module")
def runs():
    """Each configuration is simulated once per module, whichever test asks first."""
    cache: dict = {}

    def run(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = run_simulation(SimOptions(**{**BASE, **overrides}))
        return cache[key]

    return run


def ratio(result, baseline) -> float:
    return result.summary["final_val_loss"] / baseline.summary["final_val_loss"]


def test_the_clean_swarm_learns(runs):
    clean = runs()
    assert clean.summary["final_val_loss"] < 0.65 * clean.summary["initial_val_loss"]
    assert clean.summary["accepted"] == 9 * 6 and clean.summary["rejected"] == 0


def test_a_third_of_sign_flippers_slow_the_mean_by_more_than_ten_percent(runs):
    clean = runs()
    mean = runs(byzantine=A_THIRD, attack="signflip")
    assert mean.summary["accepted"] == 9 * 6  # the flipped updates pass the rules
    assert ratio(mean, clean) > 1.10


# Centered clipping's radius follows the honest spread. Since every node starts each round from a fresh inner
# optimizer (so that updates can be re-executed), honest updates agree less in direction, the radius takes in
# sign-flippers at the honest norm, and cclip ends at 1.25x the clean loss, as the mean does (1.26x). Strict:
# when a change brings cclip back within 10%, this marker must go.
CCLIP_SIGNFLIP = pytest.mark.xfail(strict=True, reason="cclip's radius admits sign-flippers at the honest norm")


@pytest.mark.parametrize("aggregator", ROBUST)
def test_a_third_of_sign_flippers_leave_every_robust_rule_within_ten_percent(runs, aggregator, request):
    if aggregator == "cclip":
        request.applymarker(CCLIP_SIGNFLIP)
    clean = runs()
    robust = runs(byzantine=A_THIRD, attack="signflip", aggregator=aggregator)
    assert robust.summary["accepted"] == 9 * 6  # the attackers' updates pass the rules
    assert ratio(robust, clean) <= 1.10


# No claim about the aggregation rules under ALIE: it hides inside the honest spread to fool robust rules, but
# here (z = 0.76 for 3 of 9, and 1.22 for 4 of 9) it moves no rule, the plain mean included, by more than 1%
# (mean 1.006x, median 1.010x, krum 1.001x the clean loss), so "robust rules stay within 10%" could not fail.
# What can fail is the attack itself: its forgeries must reach the aggregator.
def test_alie_forgeries_pass_every_rule_and_reach_the_aggregator(runs):
    # identical forgeries would be refused as copies of one another, and unbounded ones by the norm bound
    alie = runs(byzantine=A_THIRD, attack="alie")
    assert alie.summary["accepted"] == 9 * 6 and alie.summary["rejected"] == 0


def test_alie_z_follows_the_paper():
    # n = 50, f = 24 in Baruch et al.: s = floor(50/2 + 1) - 24 = 2, z = Phi^-1(48/50) ~ 1.75
    assert math.isclose(alie_z(50, 24), 1.7507, abs_tol=1e-3)
    assert math.isclose(alie_z(9, 3), 0.7647, abs_tol=1e-3)


SMALL = {**BASE, "workers": 4, "rounds": 3, "byzantine": 0.25, "attack": "scale"}  # one attacker


def test_the_norm_bound_rejects_a_scale_attack_above_it_and_quarantines_the_attacker():
    # honest norms here are about 1; x1000 is far above the default rules' bound of 100. Each rejection slashes
    # (-100 reputation); below the floor of -200 the coordinator quarantines the node after its third round.
    result = run_simulation(SimOptions(**{**SMALL, "rounds": 4}, scale_factor=1000))
    rows = result.rows[1:]
    assert all(r["honest_norm"] * 1000 > 100 for r in rows)
    assert [r["rejected_by"] for r in rows] == [{"norm-bound": 1}] * 3 + [{}]
    assert [r["quarantined"] for r in rows] == [0, 0, 1, 0] and rows[-1]["workers"] == 3
    assert [r["accepted"] for r in rows] == [3, 3, 3, 3]
    assert result.summary["final_val_loss"] < 0.75 * result.summary["initial_val_loss"]


def test_a_scale_attack_under_the_norm_bound_breaks_the_mean_but_not_the_median():
    # x40 of honest norms of 1.1 to 1.4 slips under the bound of 100: the rules pass it, and only the aggregator
    # can help
    mean = run_simulation(SimOptions(**SMALL, scale_factor=40))
    median = run_simulation(SimOptions(**SMALL, aggregator="median", scale_factor=40))
    assert all(r["honest_norm"] * 40 < 100 and r["rejected"] == 0 for r in mean.rows[1:])
    # the mean barely learns (with fp32 deltas it ends above where it started; int8 deltas with error feedback
    # spread the blown-up step over rounds, and it ends about 3% lower), while the median learns as if unattacked
    assert mean.summary["final_val_loss"] > 0.95 * mean.summary["initial_val_loss"]
    assert median.summary["final_val_loss"] < 0.75 * median.summary["initial_val_loss"]
    # the median discards the attacker's accepted updates (trimmed in most coordinates), and each discard costs
    # reputation; the mean uses them, so there the same updates earn points
    assert median.summary["reputation"]["attackers"] < mean.summary["reputation"]["attackers"]
    assert median.summary["reputation"]["attackers"] < 0 < median.summary["reputation"]["honest"]


def test_a_hundred_workers_with_thirty_percent_churn_converge():
    result = run_simulation(SimOptions(workers=100, churn=0.3, rounds=3, inner_steps=2, batch=8, lr=3e-3,
                                       seed=0, corpus_bytes=3_000_000, out=None))
    rows = result.rows[1:]
    assert [r["left"] for r in rows] == [30, 30, 0] and [r["joined"] for r in rows] == [30, 30, 0]
    assert all(r["accepted"] == 100 and r["rejected"] == 0 for r in rows)
    losses = [r["val_loss"] for r in result.rows]
    assert losses[-1] < 0.85 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_int8_sends_at_least_four_times_fewer_bytes_at_the_same_loss(runs):
    # one float32 scale per 256 values caps int8 at 4 * 256 / (256 + 4) = 3.94x; the job's int8 deflates its
    # levels (lossless) and goes past 4x (4.34x here)
    fp32, int8 = runs(), runs(codec="int8")
    assert fp32.summary["bytes_per_update"] / int8.summary["bytes_per_update"] >= 4.0
    assert abs(ratio(int8, fp32) - 1) <= 0.02


def test_topk_sends_at_least_twenty_five_times_fewer_bytes_and_catches_up_with_fp32(runs):
    # 2% of the values at 8 bytes each (25x), deflated (31x here); what it leaves out waits in the error
    # feedback, so it starts slowly and narrows the gap round by round. It came within 2% of fp32 at 12 rounds
    # while nodes kept their inner optimizer across rounds; with a fresh one each round fp32 DiLoCo ends 13%
    # lower and top-k where it was, so at 12 rounds top-k is 17.6% behind (SparseLoCo-class codecs: issue 12)
    fp32, topk = runs(rounds=12), runs(rounds=12, codec="topk")
    assert fp32.summary["bytes_per_round"] / topk.summary["bytes_per_round"] >= 25.0
    assert topk.rows[3]["val_loss"] > 1.2 * fp32.rows[3]["val_loss"]
    assert ratio(topk, fp32) <= 1.20
    assert ratio(topk, fp32) < topk.rows[3]["val_loss"] / fp32.rows[3]["val_loss"]


def test_json_lines_csv_and_png_hold_every_round(tmp_path, capsys):
    out = tmp_path / "sim"
    code = main(["--workers", "3", "--rounds", "2", "--inner-steps", "2", "--corpus-bytes", "1000000",
                 "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    per_round, summary = lines[:-1], lines[-1]
    assert [r["round"] for r in per_round] == [0, 1, 2]
    assert summary["final_val_loss"] == per_round[-1]["val_loss"] < per_round[0]["val_loss"]
    assert summary["accepted"] == 6 and summary["rejected"] == 0
    assert summary["bytes_per_round"] == 3 * 4 * summary["params"]
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in per_round]
    png = (out / "val_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_the_summary_gives_upload_bytes_per_token_against_fp32_data_parallel(tmp_path, capsys):
    # 2 workers x 2 rounds x H = 3 steps of 4 windows of 64 tokens; fp32 sends one vector per round where data
    # parallel sends one per step, so the ratio is H
    code = main(["--workers", "2", "--rounds", "2", "--inner-steps", "3", "--batch", "4", "--corpus-bytes", "1000000",
                 "--out", str(tmp_path), "--json", "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    per_round, summary = lines[:-1], lines[-1]
    tokens = 2 * 2 * 3 * 4 * 64
    assert summary["tokens_trained"] == tokens and summary["inner_steps_trained"] == 2 * 2 * 3
    received = sum(r["bytes"] for r in per_round)  # what the coordinator counted, every update accepted
    assert summary["update_bytes"] == received == 2 * 2 * 4 * summary["params"]
    assert summary["bytes_per_token"] == received / tokens
    assert summary["ddp_bytes_per_token"] == 4 * summary["params"] * 2 * 2 * 3 / tokens
    assert summary["ddp_bytes_per_token"] / summary["bytes_per_token"] == pytest.approx(3)


MESH = dict(workers=6, rounds=3, inner_steps=2, batch=4, seed=0, corpus_bytes=3_000_000, out=None)


def test_workers_fetch_from_each_other_and_train_the_same_bits_as_the_star(monkeypatch):
    # a chunk waits PEER_WAIT_S of wall-clock time for a peer before the coordinator serves it; stretched here so
    # that a slow or busy machine cannot reroute one. Nothing in these runs needs that fallback: every chunk's seed
    # is a worker of the round, and the data plane runs before any worker trains.
    monkeypatch.setattr(swarm, "PEER_WAIT_S", 60.0)
    star = run_simulation(SimOptions(**MESH, peers=0))
    mesh = run_simulation(SimOptions(**MESH, peers=3))
    # only the bytes' routes differ: every round's model, so the training, is the same to the bit
    assert [r["model_hash"] for r in mesh.rows] == [r["model_hash"] for r in star.rows]
    assert mesh.summary["final_val_loss"] == star.summary["final_val_loss"]
    assert star.summary["model_bytes_from_peers"] == 0
    for star_row, mesh_row in zip(star.rows[1:], mesh.rows[1:]):
        # the workers hold the same models, fetched mostly from each other (5 of 6 copies, where seeds are one)
        fetched = mesh_row["model_bytes_from_peers"] + mesh_row["model_bytes_from_coordinator"]
        assert fetched == star_row["model_bytes_from_coordinator"]
        assert mesh_row["model_bytes_from_peers"] >= 4 * mesh_row["model_bytes_from_coordinator"]
    for star_row, mesh_row in zip(star.rows[2:], mesh.rows[2:]):  # rounds after the first: every worker takes the delta
        delta = mesh_row["delta_bytes"]
        assert delta > 0 and star_row["coordinator_bytes_out"] >= 6 * delta
        assert mesh_row["coordinator_bytes_out"] <= 2 * delta


OVERLAP = dict(workers=3, rounds=4, inner_steps=5, batch=8, seed=0, corpus_bytes=3_000_000, out=None)


def test_overlapped_rounds_train_on_the_model_one_round_behind_and_learn():
    plain = run_simulation(SimOptions(**OVERLAP))
    overlapped = run_simulation(SimOptions(**OVERLAP, overlap=True))

    def trained_on(result) -> dict[int, set[str]]:
        models: dict[int, set[str]] = {}
        for u in result.uploads:
            models.setdefault(u["round"], set()).add(u["model_hash"])
        return models

    # without overlap, round r trains on the model after r rounds; with it, the job's first round runs alone and
    # round r > 1 trains on the model after r - 1 (rounds 1 and 2 both on the one after round 0): each aggregate
    # from round 2 on steps the model a round later
    assert trained_on(plain) == {r: {plain.rows[r]["model_hash"]} for r in range(4)}
    assert trained_on(overlapped) == {r: {overlapped.rows[max(min(r, 1), r - 1)]["model_hash"]} for r in range(4)}
    # rounds 0 and 1 are the same work in both runs, so their aggregates make the same models, to the bit; from
    # there the delayed step leads elsewhere
    assert [r["model_hash"] for r in overlapped.rows[:3]] == [r["model_hash"] for r in plain.rows[:3]]
    assert overlapped.rows[3]["model_hash"] != plain.rows[3]["model_hash"]
    assert overlapped.summary["accepted"] == 3 * 4 and overlapped.summary["rejected"] == 0
    assert overlapped.summary["tokens_trained"] == plain.summary["tokens_trained"]
    assert overlapped.summary["final_val_loss"] < 0.75 * overlapped.summary["initial_val_loss"]


@pytest.mark.parametrize("options, message", [
    (dict(byzantine=0.5), "--byzantine must be a fraction in [0, 0.5)"),
    (dict(byzantine=-0.1), "--byzantine"),
    (dict(churn=1.0), "--churn"),
    (dict(attack="bribe"), "unknown --attack 'bribe'"),
    (dict(aggregator="vote"), "unknown --aggregator 'vote'"),
    (dict(workers=2, byzantine=0.2), "rounds to no attacker"),
    (dict(peers=-1), "--peers must be at least 0"),
])
def test_bad_options_are_typed_errors(options, message):
    with pytest.raises(SimulationError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SimOptions(**options)


def test_the_command_line_refuses_a_bad_fraction(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--byzantine", "0.7"])
    assert exit_.value.code == 2
    assert "must be a fraction in [0, 0.5)" in capsys.readouterr().err
