"""The operator dashboard (/dashboard) in a real Chromium, against a real coordinator, trainer and CLI votes.

Each test checks what a person reads on the page against the coordinator's own REST answers, never against
values the test made up. Runs in a loopback-only network namespace (`./dev test` provides it).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

# a small job: about a second a round on two CPU cores; the round cap leaves the final state still to inspect
JOB = ("--inner-steps", "4", "--batch", "8", "--deadline-seconds", "120")
ROUNDS = 20  # fewer than a proposal's 20-round voting period, so the voted-down proposal is still open at the end
SCREENSHOT = Path(tempfile.gettempdir()) / "dashboard.png"
NOTE_WITH_MARKUP = 'a gentler <img src=x onerror="window.pwned=1"> learning rate'  # API text is data, not HTML
LINE_RGB = (217, 72, 15)  # the chart's series colour, CHART.line in dashboard.js


def cli(*args: str) -> str:
    """Run `python -m server ARGS` (its propose and vote re-stamp themselves if a round closes meanwhile)."""
    result = subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def open_dashboard(chromium, url: str):
    """The page, after its first full render, and the browser whose console it writes to."""
    browser = chromium(webgpu=False, webrtc=False)
    page = browser.page()
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{url}/dashboard")
    page.wait_for_function("() => (window.swarmgradDashboard.renders || 0) >= 1", timeout=15_000)
    return page, browser


def table_rows(page, table_id: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"#{table_id} tbody tr",
                                     "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")


def credits(micro: int) -> str:
    return f"{micro / 1e6:,.6f}"


def line_pixels(page) -> int:
    """How many canvas pixels carry the chart's series colour: zero for a chart that drew no line."""
    return page.evaluate("""([r, g, b]) => {
        const c = document.getElementById('loss-chart');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4)
            if (Math.abs(data[i] - r) < 8 && Math.abs(data[i + 1] - g) < 8 && Math.abs(data[i + 2] - b) < 8) n++;
        return n;
    }""", list(LINE_RGB))


@pytest.mark.timeout(150)
def test_dashboard_shows_rounds_nodes_ledger_rules_and_votes(processes, chromium, loopback_namespace, tmp_path):
    coordinator = processes.coordinator(*JOB, "--rounds", str(ROUNDS))
    coordinator.wait_ready()
    key = tmp_path / "trainer.key"
    # one round that earns the trainer reputation, then it leaves: with no node, no round closes, so both votes
    # are in before the job can move on, however fast the machine
    first = processes.trainer(coordinator.url, "--key-file", str(key), "--max-rounds", "1")
    assert first.wait(90) == 0, first.output()
    coordinator.wait_for(lambda s: s["round"] == 1 and [n["state"] for n in s["nodes"]] == ["offline"], 30,
                         "the committed round that earned the trainer reputation, and the trainer gone")
    page, browser = open_dashboard(chromium, coordinator.url)  # opened mid-run: what follows arrives by refresh

    applied = cli("governance", "propose", "--coordinator", coordinator.url, "--key-file", str(key),
                  "--set-param", "inner_steps=3", "--note", "shorter rounds").split()[1]
    cli("governance", "vote", "--coordinator", coordinator.url, "--key-file", str(key), applied, "yes")
    # voted down by all the reputation there is: the quorum is met, the threshold never is, so it stays open
    # until its voting period (longer than this job) ends
    refused = cli("governance", "propose", "--coordinator", coordinator.url, "--key-file", str(key),
                  "--set-param", "lr=0.002", "--note", NOTE_WITH_MARKUP).split()[1]
    cli("governance", "vote", "--coordinator", coordinator.url, "--key-file", str(key), refused, "no")
    assert coordinator.status()["round"] == 1  # both votes in before a round closed after them
    processes.trainer(coordinator.url, "--key-file", str(key))  # the same node, back for the other rounds

    # once finished and the trainer gone, nothing changes any more: the page must settle on exactly these values
    final = coordinator.wait_for(lambda s: s["state"] == "finished" and [n["state"] for n in s["nodes"]] == ["offline"],
                                 90, f"{ROUNDS} committed rounds and the trainer sent home")
    governance = coordinator.status_of("/api/governance")
    ledger = coordinator.status_of("/api/ledger")
    page.wait_for_function(f"() => document.querySelector('#rounds tbody td')?.innerText === '{ROUNDS}'",
                           timeout=10_000)
    page.wait_for_function("() => document.getElementById('job-state').innerText === 'finished' && "
                           "document.querySelector('#nodes tbody td:nth-child(5)')?.innerText === 'offline'",
                           timeout=10_000)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # the job summary, with the change the vote made
    assert not [line for line in browser.console if line.startswith(("[error]", "[pageerror]"))], browser.console
    assert page.inner_text("#connection").startswith("live")
    assert page.is_hidden("#unreachable")
    assert page.inner_text("#job-round") == f"{ROUNDS} of {ROUNDS}"
    assert page.inner_text("#job-loss") == f"{final['val_loss']:.4f}"
    assert page.inner_text("#job-params") == f"{final['job']['params']:,}"
    assert page.inner_text("#job-steps") == "3 × 8" and final["job"]["inner_steps"] == 3
    assert page.inner_text("#job-aggregator") == final["job"]["aggregator"] == "mean"

    # every committed round, newest first, with the coordinator's own validation losses
    shown = {int(r[0]): r[1:] for r in table_rows(page, "rounds")}
    assert list(shown) == [h["round"] for h in reversed(final["history"])] == list(range(ROUNDS, -1, -1))
    for h in final["history"]:
        assert shown[h["round"]] == [f"{h['val_loss']:.4f}", str(h["accepted"]), str(h["rejected"]),
                                     f"{h['tokens']:,}", f"{h['bytes']:,}", f"{h['coordinator_bytes_out']:,}"]
    assert final["history"][-1]["val_loss"] < final["history"][0]["val_loss"]
    assert page.eval_on_selector("#loss-chart", "c => c.dataset.points") == str(ROUNDS + 1)
    assert line_pixels(page) > 200  # the loss line and its points were drawn

    # the trainer, paid for its work
    (node,) = final["nodes"]
    (row,) = table_rows(page, "nodes")
    node_id, name, team, kind, state, path, speed, busy, peers, model_bytes, reputation, balance, stake, updates = row
    assert (name, team) == ("-", "-")  # it chose none
    assert page.inner_text("#swarm-online") == "0" and page.inner_text("#swarm-paused") == "0"  # it went home
    assert 0 < node["utilisation"] <= 1 and busy == f"{round(100 * node['utilisation'])}%"
    assert peers == "0" and model_bytes == f"0.0 MB / {node['bytes_from_coordinator'] / 1e6:.1f} MB"
    assert node["bytes_from_coordinator"] >= 4 * final["job"]["params"]  # alone, it got its models from here
    assert node_id == node["id"][:12] + "…"
    assert kind == "trainer" == node["kind"]
    assert state == node["state"]
    assert reputation == str(node["reputation"]) and node["reputation"] > 0
    assert balance == credits(node["balance"]) and float(balance.replace(",", "")) > 0
    assert stake == credits(node["stake"])
    assert speed == f"{round(node['tokens_per_second']):,}"
    assert updates == f"{node['updates_accepted']} / {node['updates_rejected']}" == f"{ROUNDS} / 0"

    # the books: every account's balance and the newest entry first
    balances = {r[0]: r[1] for r in table_rows(page, "balances")}
    assert balances[node["id"][:12] + "…"] == credits(ledger["balances"][node["id"]])
    assert balances["stake:" + node["id"][:12] + "…"] == credits(ledger["balances"]["stake:" + node["id"]])
    newest = table_rows(page, "entries")[0]
    last = ledger["entries"][-1]
    assert newest[:3] == [str(last["seq"]), str(last["round"]), last["kind"]]

    # the rulebook in force
    rules = {r[0]: r[1:] for r in table_rows(page, "rules")}
    assert set(rules) == {r["id"] for r in governance["rules"]}
    norm_bound = next(r for r in governance["rules"] if r["id"] == "norm-bound")
    assert rules["norm-bound"] == ["update", norm_bound["reason"], "enabled" if norm_bound["enabled"] else "disabled",
                                   "slash" if norm_bound["slash"] else "-"]

    # the open proposal with its vote and tally, and the one the vote applied
    card = page.locator(f'article.proposal[data-proposal-id="{refused}"]')
    assert card.locator(".change").inner_text() == "set lr = 0.002"
    assert f"“{NOTE_WITH_MARKUP}”" in card.inner_text()  # shown as the text it is, never run as markup
    assert card.locator("img").count() == 0 and page.evaluate("window.pwned") is None
    tally = next(p["tally"] for p in governance["proposals"] if p["proposal"]["id"] == refused)
    assert tally["voted_weight"] == tally["total_weight"] > 0 and tally["yes_weight"] == 0
    assert card.locator(".weights").inner_text() == f"yes 0 / voted {tally['voted_weight']} / total " \
                                                    f"{tally['total_weight']}"
    assert "quorum 1/2: 100% voted ✓" in card.inner_text()
    assert "threshold 2/3: 0% yes ✗" in card.inner_text()
    votes = [r.split("\t") for r in card.locator("table.votes tbody tr").all_inner_texts()]
    (vote,) = next(p["votes"] for p in governance["proposals"] if p["proposal"]["id"] == refused)
    assert votes == [[vote["voter"][:12] + "…", "no", str(vote["round"])]]
    assert page.locator("article.proposal").count() == 1
    decided = {r[0]: r[1:] for r in table_rows(page, "decided")}
    state_of_applied = next(p for p in governance["proposals"] if p["proposal"]["id"] == applied)
    assert decided[applied[:12] + "…"] == ["set inner_steps = 3", "applied", str(state_of_applied["decided_round"]),
                                          state_of_applied["outcome"]]


@pytest.mark.timeout(90)
def test_dashboard_says_the_coordinator_is_unreachable_once_it_stops(processes, chromium):
    coordinator = processes.coordinator(*JOB)
    coordinator.wait_ready()
    page, _ = open_dashboard(chromium, coordinator.url)
    assert page.inner_text("#connection").startswith("live")
    assert page.is_hidden("#unreachable")
    model = page.inner_text("#job-model")
    assert model.startswith("tiny")

    coordinator.stop()
    page.wait_for_selector("#unreachable", state="visible", timeout=10_000)
    banner = page.inner_text("#unreachable")
    assert banner.startswith(f"Cannot reach the coordinator at {coordinator.url}")
    assert "Is it still running?" in banner and "Retrying every 2 s" in banner
    assert page.inner_text("#connection") == "unreachable"
    assert page.inner_text("#job-model") == model  # the last figures stay, marked stale, rather than vanishing
    assert page.evaluate("document.body.classList.contains('stale')")
    page.screenshot(path=str(SCREENSHOT.with_name("dashboard-unreachable.png")), full_page=True)
