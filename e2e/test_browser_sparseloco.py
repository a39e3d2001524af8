"""A real Chromium page sends sparseloco updates encoded by its WGSL kernel, residual kept on its GPU, and the
coordinator accepts them: the page's whole path, SwiftShader's WebGPU to the coordinator's numpy decoder."""

from __future__ import annotations

import sqlite3

import pytest

from e2e.test_browser_node import JOB, open_page, wait_for_state
from shared.compress import encoded_size, parse_codec


@pytest.mark.timeout(240)
def test_the_page_encodes_sparseloco_on_its_gpu_and_the_coordinator_accepts_every_update(processes, chromium,
                                                                                           loopback_namespace):
    coordinator = processes.coordinator(*JOB, "--rounds", "2", "--codec", "sparseloco")
    initial = coordinator.wait_ready()
    page = open_page(chromium, coordinator.url)
    page.click("#contribute")
    wait_for_state(page, "s.updatesAccepted >= 1", 150)

    final = coordinator.wait_for(lambda s: s["state"] == "finished", 150, "2 committed rounds")
    history = final["history"]
    # round 2's update carries round 1's residual, held on the GPU in between
    assert all(h["accepted"] == 1 and h["rejected"] == 0 for h in history[1:]), history
    assert history[2]["val_loss"] < initial["val_loss"], history  # 5.54 -> 5.49 -> 5.32 here
    assert final["job"]["codec"] == "sparseloco:bits=2,chunk=4096,k=64"
    with sqlite3.connect(coordinator.data_dir / "state.db") as db:
        sizes = [size for (size,) in db.execute("SELECT bytes FROM updates WHERE accepted = 1")]
    assert sizes == [encoded_size(parse_codec("sparseloco"), final["job"]["params"])] * 2
