"""The "Try the model" box in a real Chromium: it generates with WGSL on WebGPU (SwiftShader here) from the
coordinator's current model, and the tokens it streams at temperature 0 are torch's greedy tokens for that model,
for a bytes job and for a BPE job (whose prompt the page encodes with the tokenizer the coordinator serves).

The reference is server/sample.py's torch loop on the very bytes the coordinator serves.
"""

from __future__ import annotations

import json
import urllib.request
from array import array

import pytest
import torch
from tokenizers import Tokenizer

from server.model import GPT, load_flat_parameters
from server.sample import generate
from shared.manifest import Manifest, assemble
from shared.model import GPTConfig
from tests.conftest import ROOT

PROMPT = "The swarm trains one model together: "
NEW_TOKENS = 24


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def served_model(url: str) -> tuple[GPT, str]:
    """The coordinator's current model, from its blobs as a browser gets it, and that model's hash."""
    status = json.loads(fetch(url + "/api/status"))
    manifest = Manifest.from_bytes(fetch(f"{url}/api/blobs/{status['manifest']}"), status["manifest"])
    data = assemble(manifest, [fetch(f"{url}/api/blobs/{name}") for name in manifest.chunks])
    model = GPT(GPTConfig.from_dict(status["job"]["config"]))
    load_flat_parameters(model, torch.tensor(array("f", data)))
    return model, status["model_hash"]


def generate_in_box(page, prompt: str, count: int) -> dict:
    """Type into the box, press Generate at temperature 0, and return its state once it has finished, with
    `updates`: how many times the generated text changed on the page."""
    page.wait_for_function("() => window.swarmgradGenerate !== undefined")
    page.evaluate("""() => {  // a streamed answer changes the box once per token, not once at the end
        window.outputUpdates = 0;
        new MutationObserver((records) => { window.outputUpdates += records.length; })
            .observe(document.getElementById('try-output-new'), {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#try-prompt", prompt)
    page.fill("#try-tokens", str(count))
    page.fill("#try-temperature", "0")
    page.click("#try-generate")
    page.wait_for_function("() => ['done', 'failed', 'stopped'].includes(swarmgradGenerate.state.phase)",
                           timeout=120_000)
    return {**page.evaluate("() => swarmgradGenerate.state"), "updates": page.evaluate("() => window.outputUpdates")}


@pytest.mark.timeout(150)
def test_box_streams_torch_greedy_tokens_from_the_coordinators_model(processes, chromium):
    coordinator = processes.coordinator()
    coordinator.wait_ready()
    model, model_hash = served_model(coordinator.url)
    expected = generate(model, list(PROMPT.encode()), NEW_TOKENS, temperature=0.0)
    browser = chromium(webgpu=True, webrtc=False)
    page = browser.page()
    page.goto(coordinator.url + "/")

    state = generate_in_box(page, PROMPT, NEW_TOKENS)

    assert state["phase"] == "done", state["message"]
    assert state["tokens"] == expected
    assert state["modelHash"] == model_hash
    text = bytes(expected).decode("utf-8", errors="replace")
    assert state["text"] == text
    assert page.inner_text("#try-output-new") == text
    assert state["updates"] >= NEW_TOKENS

    dashboard = browser.page()  # the operators' page carries the same box
    dashboard.goto(coordinator.url + "/dashboard")
    dashboard.wait_for_function("() => window.swarmgradGenerate?.state.phase === 'idle'")
    assert dashboard.is_visible("#try-generate")


@pytest.mark.timeout(150)
def test_box_encodes_and_decodes_with_the_jobs_bpe_tokenizer(processes, chromium):
    # the corpus is this repository's shared/ (about 230 kB): a 512-token BPE trains on it in about a second
    coordinator = processes.coordinator("--data", str(ROOT / "shared"), "--tokenizer", "bpe:512")
    coordinator.wait_ready()
    tokenizer = Tokenizer.from_str(fetch(coordinator.url + "/api/tokenizer").decode())
    prompt = "def model_config(name: str) -> GPTConfig:\n    "
    model, _ = served_model(coordinator.url)
    expected = generate(model, tokenizer.encode(prompt).ids, NEW_TOKENS, temperature=0.0)
    page = chromium(webgpu=True, webrtc=False).page()
    page.goto(coordinator.url + "/dashboard")

    state = generate_in_box(page, prompt, NEW_TOKENS)

    assert state["phase"] == "done", state["message"]
    assert state["tokens"] == expected
    assert max(expected) >= 256  # merged tokens, not bytes, reached the page
    assert state["text"] == tokenizer.decode(expected)
