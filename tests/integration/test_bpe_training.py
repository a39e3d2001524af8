"""Real processes: a coordinator whose job is created with `--tokenizer bpe:2048`, and a PyTorch trainer that trains
on its uint16 shards without ever seeing the tokenizer, in a loopback-only namespace."""

from __future__ import annotations

import hashlib
import urllib.request

from server.tokenizer import TOKENIZER_FILE, TOKENIZER_META, job_tokenizer
from shared.tokens import read_tokens
from tests.conftest import ROOT

VOCAB = 2048
TRAIN_ARGS = ("--tokenizer", f"bpe:{VOCAB}", "--inner-steps", "6", "--batch", "8", "--deadline-seconds", "90",
              "--rounds", "3")


def corpus_file(path):
    """This repository's own Python sources (about 0.4 MB): a real corpus, generated offline."""
    sources = sorted((ROOT / "shared").glob("*.py")) + sorted((ROOT / "server").glob("*.py"))
    path.write_bytes(b"".join(p.read_bytes() for p in sources))
    return path


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_a_bpe_job_trains_three_rounds_and_its_validation_loss_falls(processes, loopback_namespace, tmp_path):
    data = corpus_file(tmp_path / "corpus.py.txt")
    coordinator = processes.coordinator("--data", str(data), *TRAIN_ARGS)
    initial = coordinator.wait_ready()
    assert initial["job"]["tokenizer"] == f"bpe:{VOCAB}" and initial["job"]["config"]["vocab_size"] == VOCAB

    # the job's tokenizer is stored with it and served; its shards are uint16 ids the tokenizer decodes to the text
    served = fetch(coordinator.url + "/api/tokenizer")
    assert served == (coordinator.data_dir / TOKENIZER_FILE).read_bytes()
    with coordinator.read_store() as books:
        record = books.get_meta(TOKENIZER_META)
    assert record["sha256"] == hashlib.sha256(served).hexdigest()
    ids = read_tokens(fetch(coordinator.url + "/api/shards/0"), VOCAB)
    text = job_tokenizer(coordinator.data_dir).decode(ids)
    assert len(ids) > 1000 and text in data.read_text()

    trainer = processes.trainer(coordinator.url)
    final = coordinator.wait_for(lambda s: s["state"] == "finished", 300, "3 committed rounds")
    history = final["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert all(h["accepted"] == 1 and h["rejected"] == 0 for h in history[1:]), history
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5, history
    assert trainer.wait(60) == 0
