"""The leaderboard (/leaderboard) in a real Chromium, against a real coordinator and a trainer that named itself:
what a person reads there is the coordinator's own /api/leaderboard answer. Runs in a loopback-only network
namespace (`./dev test` provides it)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

SCREENSHOT = Path(tempfile.gettempdir()) / "leaderboard.png"
NAME, TEAM = "<b>Ada</b>'s GPU", "Lab 7"  # markup in a name is text on the page, never HTML


def table_rows(page, table_id: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"#{table_id} tbody tr",
                                     "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")


@pytest.mark.timeout(120)
def test_leaderboard_shows_the_named_trainer_with_its_credits(processes, chromium, loopback_namespace):
    coordinator = processes.coordinator("--inner-steps", "2", "--batch", "4", "--deadline-seconds", "120",
                                        "--rounds", "1")
    coordinator.wait_ready()
    trainer = processes.trainer(coordinator.url, "--max-rounds", "1", "--name", NAME, "--team", TEAM)
    assert trainer.wait(90) == 0, trainer.output()
    coordinator.wait_for(lambda s: s["state"] == "finished", 30, "the job's one round")
    (node,) = coordinator.status_of("/api/leaderboard")["nodes"]
    assert node["credits_micro"] > 0

    browser = chromium(webgpu=False, webrtc=False)
    page = browser.page()
    page.set_viewport_size({"width": 1200, "height": 700})
    page.goto(f"{coordinator.url}/leaderboard")
    page.wait_for_function("() => (window.swarmgradLeaderboard.renders || 0) >= 1", timeout=15_000)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert not [line for line in browser.console if line.startswith(("[error]", "[pageerror]"))], browser.console
    credits = f"{node['credits_micro'] / 1e6:,.6f}"
    (row,) = table_rows(page, "board-nodes")
    assert row[:8] == ["1", NAME, node["id"][:12] + "…", TEAM, "trainer", credits, "1", f"{node['tokens']:,}"]
    assert row[8] == "1"
    (team,) = table_rows(page, "board-teams")
    assert team[:4] == ["1", TEAM, "1", credits]
    assert page.locator("#board-nodes b").count() == 0  # the name's markup stayed text
    assert page.is_hidden("#unreachable") and page.inner_text("#connection").startswith("live")
