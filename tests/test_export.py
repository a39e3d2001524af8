"""Exporting a job's model: the Hugging Face directory loads in transformers and computes our logits, its tokenizer
round-trips text in each tokenizer mode, the flat safetensors file holds our names and values, a running
coordinator serves it, and what cannot be exported is a clear error.

Jobs are made by the real Coordinator on a small generated corpus (it initialises and commits round 0).
"""

from __future__ import annotations

import random
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from server.cli import main
from server.coordinator import Coordinator, JobConfig
from server.coordinator.checkpoint import model_hash
from server.corpus import load_corpus
from server.export import (ExportedModel, ExportError, load_exported, read_safetensors, safetensors_header,
                           write_hf, write_safetensors)
from server.model import GPT, load_flat_parameters
from server.tokenizer import ByteTokenizer, job_tokenizer
from shared.model import GPTConfig, num_parameters, parameter_layout

MAX_RELATIVE_ERROR = 1e-5  # transformers' GPT-2 against our torch GPT, same weights, float32 on the CPU
TEXTS = ["plain ascii", "héllo wörld, ça va? 🙂🚀", "tabs\tand\nnewlines  and  spaces ", "日本語のテキスト", "x"]
WORDS = ("the swarm trains one model together across browsers and machines while every round closes on time; "
         "def train(model, batch): return model.step(batch) # ünïcode ✓").split(" ")
# nonzero biases and layer norms, so that every parameter's place in the mapping shows in the logits
SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def write_corpus(path: Path, words: int = 30_000) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)), encoding="utf-8")
    return path


def make_job(directory: Path, **job) -> Path:
    """A data directory whose job the real Coordinator created (round 0 committed); returns it."""
    corpus = load_corpus(write_corpus(directory / "corpus.txt"))
    coordinator = Coordinator(directory / "data", JobConfig(**job), corpus)
    coordinator.store.close()
    return directory / "data"


def random_model(cfg: GPTConfig = SMALL, seed: int = 0) -> ExportedModel:
    params = np.random.default_rng(seed).normal(0.0, 0.2, num_parameters(cfg)).astype(np.float32)
    return ExportedModel("custom", cfg, 3, model_hash(params), params, ByteTokenizer())


def our_logits(model: ExportedModel, ids: list[int]) -> torch.Tensor:
    gpt = GPT(model.cfg)
    load_flat_parameters(gpt, torch.from_numpy(model.params))
    with torch.no_grad():
        return gpt(torch.tensor([ids]))[0][0]


@pytest.fixture(scope="module")
def byte_job(tmp_path_factory) -> Path:
    return make_job(tmp_path_factory.mktemp("bytes"), model="tiny")


@pytest.fixture(scope="module")
def bpe_job(tmp_path_factory) -> Path:
    return make_job(tmp_path_factory.mktemp("bpe"), model="tiny", tokenizer="bpe:512")


def test_hf_export_computes_our_logits_with_untied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = random_model()
    write_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("A fixed prompt: ünïcode too.")["input_ids"]
    assert ids == list("A fixed prompt: ünïcode too.".encode())
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = our_logits(model, ids)
    assert (theirs - ours).abs().max() <= MAX_RELATIVE_ERROR * ours.abs().max()
    assert hf.config.tie_word_embeddings is False
    layout = {spec.name: spec for spec in parameter_layout(model.cfg)}
    lm_head = layout["lm_head.weight"]
    expected = model.params[lm_head.offset : lm_head.offset + lm_head.numel].reshape(lm_head.shape)
    assert np.array_equal(hf.lm_head.weight.detach().numpy(), expected)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)


def test_export_command_writes_an_hf_directory_of_the_jobs_latest_round(byte_job, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["export", "--data-dir", str(byte_job), "--format", "hf", str(tmp_path / "out")]) == 0
    exported = load_exported(byte_job)
    printed = capsys.readouterr().out
    assert "round 0 of model tiny" in printed and exported.model_hash in printed
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf.config.swarmgrad == {"model": "tiny", "round": 0, "model_hash": exported.model_hash,
                                   "tokenizer": "bytes"}
    ids = list(b"def train(model")
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = our_logits(exported, ids)
    assert (theirs - ours).abs().max() <= MAX_RELATIVE_ERROR * ours.abs().max()


@pytest.mark.parametrize("job", ["byte_job", "bpe_job"])
def test_exported_tokenizer_round_trips_text_as_the_job_encodes_it(job, request, tmp_path):
    from transformers import AutoTokenizer

    data_dir = request.getfixturevalue(job)
    exported = load_exported(data_dir)
    write_hf(exported, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = job_tokenizer(data_dir, exported.cfg.vocab_size)
    assert (job == "bpe_job") == (exported.cfg.vocab_size == 512)
    for text in TEXTS + [" ".join(WORDS)]:
        ids = tokenizer(text)["input_ids"]
        assert ids == ours.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids) < exported.cfg.vocab_size
    if job == "bpe_job":  # merges make common words single tokens
        assert len(tokenizer(" ".join(WORDS))["input_ids"]) < len(" ".join(WORDS).encode()) // 2


def test_safetensors_export_holds_our_names_values_and_config(byte_job, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    exported = load_exported(byte_job)
    write_safetensors(exported, tmp_path / "flat.safetensors")
    tensors = load_file(tmp_path / "flat.safetensors")
    layout = parameter_layout(exported.cfg)
    assert sorted(tensors) == sorted(spec.name for spec in layout)
    for spec in layout:
        assert tensors[spec.name].shape == spec.shape
        assert np.array_equal(tensors[spec.name].ravel(), exported.params[spec.offset : spec.offset + spec.numel])
    with safe_open(tmp_path / "flat.safetensors", "np") as f:
        meta = f.metadata()
    assert meta["swarmgrad.model"] == "tiny" and meta["swarmgrad.round"] == "0"
    assert meta["swarmgrad.model_hash"] == exported.model_hash and meta["swarmgrad.tokenizer"] == "bytes"
    back = read_safetensors((tmp_path / "flat.safetensors").read_bytes())
    assert (back.cfg, back.round, back.model_hash) == (exported.cfg, 0, exported.model_hash)
    assert np.array_equal(back.params, exported.params)


def test_our_reader_reads_what_the_safetensors_library_writes(tmp_path):
    from safetensors.numpy import save_file

    model = random_model()
    layout = parameter_layout(model.cfg)
    # reversed: the library lays tensors out in its own order, which the reader must not assume
    tensors = {spec.name: model.params[spec.offset : spec.offset + spec.numel].reshape(spec.shape)
               for spec in reversed(layout)}
    save_file(tensors, tmp_path / "lib.safetensors", metadata=model.metadata())
    back = read_safetensors((tmp_path / "lib.safetensors").read_bytes())
    assert np.array_equal(back.params, model.params) and back.cfg == model.cfg and back.round == 3


def test_a_bpe_export_carries_its_tokenizer_file(bpe_job, tmp_path):
    exported = load_exported(bpe_job)
    write_safetensors(exported, tmp_path / "bpe.safetensors")
    back = read_safetensors((tmp_path / "bpe.safetensors").read_bytes())
    assert back.cfg.vocab_size == 512 and back.tokenizer.json == exported.tokenizer.json
    assert back.tokenizer.encode("the swarm trains") == exported.tokenizer.encode("the swarm trains")


def test_a_damaged_safetensors_file_is_refused(tmp_path):
    model = random_model()
    good = safetensors_header(model.cfg, model.metadata()) + model.params.astype("<f4").tobytes()
    with pytest.raises(ExportError, match="shorter"):
        read_safetensors(good[:4])
    with pytest.raises(ExportError, match="header"):
        read_safetensors(good[:100])
    with pytest.raises(ExportError, match="expected F32"):
        read_safetensors(good[:-4])
    flipped = bytearray(good)
    flipped[-1] ^= 0x40
    with pytest.raises(ExportError, match="model hash"):
        read_safetensors(bytes(flipped))


def test_what_cannot_be_exported_is_a_clear_error(byte_job, tmp_path):
    with pytest.raises(ExportError, match="no swarmgrad job"):
        load_exported(tmp_path / "nothing")
    with pytest.raises(ExportError, match=r"round 7 is not committed .* rounds 0\.\.0 are"):
        load_exported(byte_job, 7)
    with pytest.raises(ExportError, match="already exists"):
        write_safetensors(load_exported(byte_job), byte_job / "state.db")
    copy = tmp_path / "copy"
    shutil.copytree(byte_job, copy)
    checkpoint = next((copy / "checkpoints").glob("round-*.ckpt"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExportError, match="does not match the hash"):
        load_exported(copy)
    checkpoint.unlink()
    with pytest.raises(ExportError, match=r"no longer kept .* \(kept: rounds none\)"):
        load_exported(copy)


def test_export_command_reports_a_missing_job_and_writes_nothing(tmp_path, capsys):
    assert main(["export", "--data-dir", str(tmp_path / "none"), "--format", "safetensors",
                 str(tmp_path / "out.safetensors")]) == 2
    assert "error: no swarmgrad job in" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_running_coordinator_serves_its_model_as_safetensors(processes):
    coordinator = processes.coordinator("--model", "n_layer=1,n_head=2,n_embd=16,block_size=32")
    status = coordinator.wait_ready()
    with urllib.request.urlopen(coordinator.url + "/api/export/latest", timeout=30) as response:
        data = response.read()
        assert response.headers["X-Swarmgrad-Model-Hash"] == status["model_hash"]
    exported = read_safetensors(data)
    assert exported.model == "n_layer=1,n_head=2,n_embd=16,block_size=32"
    assert exported.cfg == GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    assert (exported.round, exported.model_hash) == (status["round"], status["model_hash"])
