"""The job's tokenizer: bytes or a byte-level BPE trained on the corpus when the job is created (server/tokenizer.py),
and token ids on the wire (shared/tokens.py): deterministic training, exact round trips, the job's stored file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from server.coordinator.job import JobConfig, load_job
from server.coordinator.store import Store
from server.corpus import SHARD_BYTES, Corpus, CorpusError, load_corpus
from server.tokenizer import (TOKENIZER_FILE, TOKENIZER_META, BpeTokenizer, ByteTokenizer, TokenizerError,
                              TokenizerSpec, job_corpus, job_tokenizer, parse_tokenizer, train_bpe)
from server.training import token_tensor
from shared.tokens import MAX_VOCAB, TokenError, read_tokens, token_width, write_tokens
from tests.conftest import ROOT

# text the tokenizer has never seen in training: other scripts, tabs, CRLF, runs of spaces, an emoji, a final
# character without a newline
UNSEEN = ("Grüße, 世界! naïve café\r\n\tindent    ed 🐍 ‘quotes’ and\u00a0nbsp\n\n\n"
          "    def f(x): return x ** 2  # é")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """A real corpus: this repository's own shared/ sources, with the unseen text in the held-out tail. The sources
    are made ASCII, so that the cut between train and validation can never split a character."""
    sources = b"".join(p.read_bytes() for p in sorted((ROOT / "shared").glob("*.py")))
    sources = sources.decode().encode("ascii", "replace")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(sources + (UNSEEN * 40).encode())
    return path


@pytest.fixture(scope="module")
def corpus(corpus_file) -> Corpus:
    return load_corpus(corpus_file)


@pytest.fixture(scope="module")
def bpe(corpus) -> BpeTokenizer:
    return BpeTokenizer(train_bpe(corpus.train, 2048), parse_tokenizer("bpe:2048"))


def test_the_tokenizer_option_names_bytes_or_a_bpe_vocabulary():
    assert parse_tokenizer("bytes") == TokenizerSpec("bytes", 256)
    assert parse_tokenizer(" bpe:8192 ") == TokenizerSpec("bpe", 8192)
    assert str(parse_tokenizer("bpe:2048")) == "bpe:2048"
    for bad, why in [("wordpiece", "unknown tokenizer"), ("bpe:", "unknown tokenizer"), ("bpe:1000", "multiple of 64"),
                     ("bpe:256", "multiple of 64 in 512"), ("bpe:131072", "65536")]:
        with pytest.raises(TokenizerError, match=why):
            parse_tokenizer(bad)


def test_training_gives_the_same_file_in_other_processes_and_thread_counts(corpus_file, corpus):
    """Same corpus, same vocabulary: the same tokenizer bytes, whatever the hash seed or the number of threads."""
    here = hashlib.sha256(train_bpe(corpus.train, 2048).encode()).hexdigest()
    program = ("import hashlib, sys; from server.corpus import load_corpus; from server.tokenizer import train_bpe; "
               "print(hashlib.sha256(train_bpe(load_corpus(sys.argv[1]).train, 2048).encode()).hexdigest())")
    elsewhere = []
    for seed, threads in (("1", "1"), ("2", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", program, str(corpus_file)], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True)
        elsewhere.append(done.stdout.strip())
    assert elsewhere == [here, here]
    assert hashlib.sha256(train_bpe(corpus.train, 1024).encode()).hexdigest() != here


def test_text_the_tokenizer_never_saw_round_trips_exactly(bpe, corpus):
    ids = bpe.encode(UNSEEN)
    assert bpe.decode(ids) == UNSEEN
    assert len(ids) < len(UNSEEN.encode())  # it merges: fewer tokens than bytes
    validation = read_tokens(bpe.encode_bytes(corpus.validation), 2048)  # the held-out part, as the job encodes it
    assert bpe.decode(validation) == corpus.validation.decode()
    assert max(validation) < bpe.trained_size <= 2048


def test_bytes_are_their_own_tokens():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("é!") == [0xC3, 0xA9, 0x21] and tokenizer.vocab_size == 256
    assert tokenizer.decode(tokenizer.encode(UNSEEN)) == UNSEEN
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a cut character is shown, not raised
    assert tokenizer.encode_bytes(b"\xff\x00") == b"\xff\x00"


def test_token_ids_travel_as_bytes_up_to_256_and_little_endian_uint16_above():
    assert (token_width(256), token_width(257), token_width(MAX_VOCAB)) == (1, 2, 2)
    assert write_tokens([1, 258, 2047], 2048) == bytes([1, 0, 2, 1, 0xFF, 7])
    assert list(read_tokens(bytes([1, 0, 2, 1, 0xFF, 7]), 2048)) == [1, 258, 2047]
    assert read_tokens(b"abc", 256) == b"abc"
    with pytest.raises(TokenError, match="whole number"):
        read_tokens(b"abc", 2048)
    with pytest.raises(TokenError, match="outside the vocabulary"):
        read_tokens(write_tokens([2048], 4096), 2048)
    with pytest.raises(TokenError, match="does not fit"):
        write_tokens([70000], 2048)
    with pytest.raises(TokenError, match="1..65536"):
        token_width(MAX_VOCAB + 1)


def test_a_bpe_corpus_is_cut_into_shards_of_whole_token_ids(bpe, corpus):
    ids = bpe.encode_bytes(corpus.train)
    tokens = Corpus(corpus.name, ids, bpe.encode_bytes(corpus.validation), vocab_size=2048)
    shard = tokens.shard(0)
    assert len(shard) == min(SHARD_BYTES, len(ids)) and len(shard) % 2 == 0
    assert token_tensor(shard, 2048).tolist() == list(read_tokens(shard, 2048))
    assert bpe.decode(read_tokens(shard, 2048)) == corpus.train.decode()[: len(bpe.decode(read_tokens(shard, 2048)))]
    with pytest.raises(CorpusError, match="whole 2-byte ids"):
        Corpus("ragged", ids + b"x", b"", vocab_size=2048)


def test_a_new_bpe_job_trains_its_tokenizer_once_and_a_restart_reads_it(tmp_path, corpus):
    store = Store(tmp_path / "state.db")
    job = load_job(store, tmp_path, corpus, JobConfig(tokenizer="bpe:2048"))
    first = job_corpus(store, tmp_path, corpus, job)
    text = (tmp_path / TOKENIZER_FILE).read_text()
    record = store.get_meta(TOKENIZER_META)
    assert record == {"spec": "bpe:2048", "sha256": hashlib.sha256(text.encode()).hexdigest(),
                      "tokens": BpeTokenizer(text, parse_tokenizer("bpe:2048")).trained_size}
    assert first.vocab_size == 2048 and len(first.train) < len(corpus.train)
    assert job.gpt_config().vocab_size == 2048

    # a restart without --tokenizer is the same job: its stored tokenizer, not a new one
    again = load_job(store, tmp_path, corpus, JobConfig())
    assert again.tokenizer == "bpe:2048"
    assert job_corpus(store, tmp_path, corpus, again) == first
    assert job_tokenizer(tmp_path).decode(read_tokens(first.validation, 2048)) == corpus.validation.decode()


def test_a_bpe_job_whose_tokenizer_file_changed_or_went_missing_refuses_to_start(tmp_path, corpus):
    store = Store(tmp_path / "state.db")
    job = load_job(store, tmp_path, corpus, JobConfig(tokenizer="bpe:1024"))
    job_corpus(store, tmp_path, corpus, job)
    path = tmp_path / TOKENIZER_FILE
    path.write_text(train_bpe(corpus.train, 512))
    with pytest.raises(TokenizerError, match="sha256 differs"):
        job_corpus(store, tmp_path, corpus, job)
    path.unlink()
    with pytest.raises(TokenizerError, match="missing"):
        job_corpus(store, tmp_path, corpus, job)


def test_a_job_without_a_tokenizer_is_bytes(tmp_path, corpus):
    store = Store(tmp_path / "state.db")
    stored = asdict(JobConfig())
    del stored["tokenizer"]  # a job stored before --tokenizer existed
    store.set_meta("job", stored)
    job = load_job(store, tmp_path, corpus, JobConfig())
    assert job.tokenizer == "bytes" and job.gpt_config().vocab_size == 256
    assert job_corpus(store, tmp_path, corpus, job) is corpus
    assert isinstance(job_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(TokenizerError, match="missing"):
        job_tokenizer(tmp_path, vocab_size=2048)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        JobConfig(tokenizer="chars")
