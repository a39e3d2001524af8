"""`python -m server sample`: a seed gives the same text from a data directory, in another process and from a running
coordinator; greedy and top-k choose as they say; bad prompts, options and sources are clear errors."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
import torch

from kernels.generate import choose_token, window_start
from server.cli import main
from server.export import load_exported
from server.model import GPT, load_flat_parameters
from server.sample import DEFAULT_TEMPERATURE, SampleError, generate, sample
from tests.conftest import ROOT
from tests.test_export import make_job, random_model

PROMPT = "the swarm trains"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return make_job(tmp_path_factory.mktemp("sample"), model="tiny")


def python_m_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def gpt_of(model) -> GPT:
    gpt = GPT(model.cfg)
    load_flat_parameters(gpt, torch.from_numpy(model.params))
    return gpt


def test_a_seed_gives_the_same_text_in_another_process(job):
    result = python_m_server("sample", "--data-dir", str(job), "--prompt", PROMPT, "--tokens", "40", "--seed", "7",
                             "--temperature", "1.0")
    assert result.returncode == 0, result.stderr
    here = sample(load_exported(job), PROMPT, 40, 1.0, None, 7)
    assert result.stdout == here + "\n"
    assert here.startswith(PROMPT) and len(here.encode(errors="surrogatepass")) > len(PROMPT)
    assert "[round 0 of model tiny" in result.stderr


def test_other_seeds_give_other_text(job):
    model = load_exported(job)
    texts = {sample(model, PROMPT, 40, 1.0, None, seed) for seed in range(4)}
    assert len(texts) == 4


def test_generation_follows_the_shared_context_rule_and_token_choice():
    model = random_model()
    gpt = gpt_of(model)
    prompt = list(b"a prompt longer than the 32-token context of this model")
    tokens, rng, expected = list(prompt), random.Random(5), []
    start = window_start(0, len(tokens), model.cfg.block_size)
    with torch.no_grad():
        for _ in range(20):  # the window slides past block_size along the way
            logits = gpt(torch.tensor([tokens[start:]]))[0][0, -1].tolist()
            expected.append(choose_token(array("f", logits), 0.9, rng))
            tokens.append(expected[-1])
            start = window_start(start, len(tokens), model.cfg.block_size)
    assert generate(gpt, prompt, 20, 0.9, None, 5) == expected


def test_temperature_zero_and_top_k_one_both_take_the_likeliest_token():
    model = random_model()
    gpt = gpt_of(model)
    prompt = list(b"greedy")
    with torch.no_grad():
        first = int(gpt(torch.tensor([prompt]))[0][0, -1].argmax())
    greedy = generate(gpt, prompt, 10, 0.0, None, None)
    assert greedy[0] == first
    assert generate(gpt, prompt, 10, 2.0, 1, 123) == greedy


def test_top_k_draws_only_among_the_k_likeliest():
    model = random_model()
    gpt = gpt_of(model)
    with torch.no_grad():
        top3 = set(torch.topk(gpt(torch.tensor([list(b"k")]))[0][0, -1], 3).indices.tolist())
    firsts = {generate(gpt, list(b"k"), 1, 5.0, 3, seed)[0] for seed in range(60)}
    assert firsts == top3  # a hot temperature reaches all three, and nothing else


def test_sampling_from_a_running_coordinator_matches_its_data_directory(processes):
    coordinator = processes.coordinator("--model", "n_layer=1,n_head=2,n_embd=16,block_size=32")
    coordinator.wait_ready()
    result = python_m_server("sample", "--coordinator", coordinator.url, "--prompt", PROMPT, "--tokens", "30",
                             "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == sample(load_exported(coordinator.data_dir), PROMPT, 30, DEFAULT_TEMPERATURE, None, 3) + "\n"


def test_bad_prompts_and_options_are_clear_errors(job):
    model = load_exported(job)
    with pytest.raises(SampleError, match="--tokens must be in 1"):
        sample(model, PROMPT, 0, 1.0, None, 0)
    with pytest.raises(SampleError, match="prompt is empty"):
        sample(model, "", 5, 1.0, None, 0)
    with pytest.raises(SampleError, match="not valid UTF-8 text at character 3"):
        sample(model, "abc\udcff", 5, 1.0, None, 0)  # what a non-UTF-8 argv byte becomes
    with pytest.raises(SampleError, match="--temperature"):
        sample(model, PROMPT, 5, float("nan"), None, 0)
    with pytest.raises(SampleError, match=r"--top-k must be in 1\.\.256"):
        sample(model, PROMPT, 5, 1.0, 257, 0)


def test_the_command_reports_bad_input_and_missing_models(job, tmp_path, capsys):
    assert main(["sample", "--data-dir", str(job), "--prompt", PROMPT, "--tokens", "0"]) == 2
    out = capsys.readouterr()
    assert "error: --tokens must be in 1..10000, got 0" in out.err and out.out == ""
    assert main(["sample", "--data-dir", str(tmp_path / "none"), "--prompt", PROMPT]) == 2
    assert "error: no swarmgrad job in" in capsys.readouterr().err
    assert main(["sample", "--coordinator", "http://127.0.0.1:9", "--prompt", PROMPT]) == 2
    assert "error: cannot read http://127.0.0.1:9/api/export/latest" in capsys.readouterr().err
    copy = tmp_path / "pruned"
    shutil.copytree(job, copy)
    for checkpoint in (copy / "checkpoints").glob("round-*.ckpt"):
        checkpoint.unlink()
    assert main(["sample", "--data-dir", str(copy), "--prompt", PROMPT]) == 2
    assert "error: the checkpoint of round 0 is no longer kept" in capsys.readouterr().err
