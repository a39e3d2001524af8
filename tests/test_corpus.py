"""The corpus: real text, offline, with a held-out validation split."""

from __future__ import annotations

import pytest

from server.corpus import SHARD_BYTES, CorpusError, load_corpus


def test_default_corpus_is_the_standard_library_source():
    corpus = load_corpus(max_bytes=2_000_000)
    assert "python-stdlib" in corpus.name
    assert b"def " in corpus.train and b"import " in corpus.validation
    assert len(corpus.validation) < len(corpus.train)
    assert len(corpus.shard(0)) == SHARD_BYTES
    assert corpus.shard(corpus.num_shards) == corpus.shard(0)  # indices wrap around


def test_a_text_file_is_split_into_train_and_validation(tmp_path):
    text = b"".join(b"line %d of the user's own corpus\n" % i for i in range(2000))
    (tmp_path / "mine.txt").write_bytes(text)
    corpus = load_corpus(tmp_path / "mine.txt")
    assert corpus.train + corpus.validation == text
    assert corpus.digest != load_corpus(max_bytes=100_000).digest


def test_missing_or_tiny_corpora_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "small.txt").write_bytes(b"too short")
    with pytest.raises(CorpusError, match="at least"):
        load_corpus(tmp_path / "small.txt")
    with pytest.raises(IndexError):
        load_corpus(max_bytes=100_000).shard(-1)
