"""A browser whose WebGPU buffer limits cannot hold the job says so plainly and does not join (issue 14).

The job is a custom size whose attention probabilities need one buffer far above SwiftShader's limits, while its
model stays small enough for the coordinator to start in seconds.
"""

from __future__ import annotations

import pytest

from e2e.test_browser_node import STATE_JS, open_page

# 1 layer, 4 heads of 16, context 256: 120k parameters, but each layer's probabilities at batch 16384 take
# 4 x 16384 x 4 x 256 x 256 bytes = 16 GiB, above any buffer SwiftShader allows
TOO_LARGE = ("--model", "n_layer=1,n_head=4,n_embd=64,block_size=256", "--batch", "16384")
ADAPTER_LIMITS_JS = """async () => {
  const a = await navigator.gpu.requestAdapter();
  return [a.limits.maxStorageBufferBindingSize, a.limits.maxBufferSize];
}"""


@pytest.mark.timeout(180)
def test_a_browser_refuses_a_job_too_large_for_its_gpu_and_does_not_join(processes, chromium):
    coordinator = processes.coordinator(*TOO_LARGE)
    job = coordinator.wait_ready()["job"]
    need = job["memory"]["largest_buffer_bytes"]
    assert need == 4 * 16384 * 4 * 256 * 256
    page = open_page(chromium, coordinator.url, webrtc=False)
    assert need > max(page.evaluate(ADAPTER_LIMITS_JS))  # SwiftShader: 1 GiB per binding

    page.click("#contribute")
    page.wait_for_function("() => window.swarmgrad.state.phase === 'failed'", timeout=60_000, polling=200)
    state = page.evaluate(STATE_JS)
    assert state["message"].startswith(f"This job's model ({job['model']}, {job['params']:,} parameters, batch 16384) "
                                       "needs a GPU buffer of 17179.9 MB, but this browser's WebGPU allows at most ")
    assert "so this tab cannot train it and has not joined" in state["message"]
    assert f"python -m server trainer --coordinator {coordinator.url}" in state["message"]
    assert "cannot train it" in page.inner_text("#message")
    assert page.is_enabled("#contribute")  # the user may try again, e.g. after the job changes
    assert coordinator.status()["nodes"] == []  # it never said hello
