"""A job's tokenizer: bytes (every byte a token, vocabulary 256) or a byte-level BPE that Hugging Face `tokenizers`
trains on the job's corpus when the job is created, kept in the job's data directory with its sha256 in the store.

Nodes never need it: they train on token ids (shards, shared/tokens.py) and learn the vocabulary size with the job.
Never retrain the tokenizer of an existing job (its model's embedding rows mean its ids), and never let anything but
the corpus and the vocabulary size decide what training produces: the same corpus gives the same tokenizer file.
"""

from __future__ import annotations

import hashlib
import os
import re
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.corpus import Corpus
from shared.tokens import BYTE_VOCAB, MAX_VOCAB, write_tokens

if TYPE_CHECKING:
    from server.coordinator.job import JobConfig
    from server.coordinator.store import Store

TOKENIZER_FILE = "tokenizer.json"  # in the job's data directory: Hugging Face's format, loadable as it is
TOKENIZER_META = "tokenizer"  # the store's record of it: spec, sha256 of the file, tokens training reached
MIN_BPE_VOCAB = 512  # 256 byte tokens, and at least as many merges
# the WGSL kernels read the vocabulary axis as vec4s; a multiple of 64 also keeps lm_head's 32-column tiles whole
BPE_VOCAB_MULTIPLE = 64
MIN_PAIR_FREQUENCY = 2  # a merge must occur at least twice in the corpus: a pair seen once teaches nothing
# text goes to `tokenizers` in pieces of about this many characters, cut after a newline (so no word is split):
# big enough to keep its threads busy, small enough that no one piece holds the rest up
TEXT_PIECE_CHARS = 1 << 20
_SPEC = re.compile(r"bytes|bpe:(\d+)")


class TokenizerError(ValueError):
    """A --tokenizer that cannot be used, or a job whose stored tokenizer is missing or changed; says what to do."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What --tokenizer asks for: `bytes`, or `bpe` with the job's vocabulary size (the model's embedding rows)."""

    kind: str  # "bytes" or "bpe"
    vocab_size: int

    def __str__(self) -> str:
        return "bytes" if self.kind == "bytes" else f"bpe:{self.vocab_size}"


def parse_tokenizer(text: str) -> TokenizerSpec:
    """`bytes` or `bpe:VOCAB` (VOCAB a multiple of BPE_VOCAB_MULTIPLE in MIN_BPE_VOCAB..MAX_VOCAB); TokenizerError."""
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise TokenizerError(f"unknown tokenizer {text!r}: use bytes or bpe:VOCAB (e.g. bpe:8192)")
    if match.group(1) is None:
        return TokenizerSpec("bytes", BYTE_VOCAB)
    vocab = int(match.group(1))
    if not MIN_BPE_VOCAB <= vocab <= MAX_VOCAB or vocab % BPE_VOCAB_MULTIPLE:
        raise TokenizerError(f"bpe vocabulary {vocab} must be a multiple of {BPE_VOCAB_MULTIPLE} in "
                             f"{MIN_BPE_VOCAB}..{MAX_VOCAB} (ids travel as two bytes; the GPU kernels read vec4s)")
    return TokenizerSpec("bpe", vocab)


def _text(data: bytes) -> str:
    """Corpus bytes as the text BPE works on; bytes that are not UTF-8 become U+FFFD (the stdlib and most text
    corpora are UTF-8 throughout)."""
    return data.decode("utf-8", errors="replace")


def _pieces(text: str) -> list[str]:
    """`text` cut after newlines into pieces of about TEXT_PIECE_CHARS; always the same cuts for the same text."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TEXT_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _empty_bpe() -> Tokenizer:
    """GPT-2's byte-level BPE layout: any text maps to byte tokens, and decoding gives that text back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(corpus_text: bytes, vocab_size: int) -> str:
    """A byte-level BPE of at most `vocab_size` tokens trained on `corpus_text`, as the JSON of its tokenizer file.

    Deterministic: the trainer has no randomness, counts pairs exactly (threads only split the counting) and breaks
    ties between equal counts by token id, so the same text gives the same file (tests/test_tokenizer.py checks it
    across processes). A small corpus may stop short of `vocab_size`; ids then stay below what it reached.
    """
    tokenizer = _empty_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_PAIR_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(_pieces(_text(corpus_text)), trainer)
    return tokenizer.to_str()


class ByteTokenizer:
    """Every byte of the UTF-8 text is a token (a job without --tokenizer, and every job before it)."""

    spec = TokenizerSpec("bytes", BYTE_VOCAB)
    json: str | None = None  # nothing to serve: the mapping is the identity

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; a sequence that stops inside a character ends in U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_bytes(self, data: bytes) -> bytes:
        """Corpus bytes as token ids in the wire format: themselves."""
        return bytes(data)


class BpeTokenizer:
    """A trained byte-level BPE (`json`: its tokenizer file) for a job of `spec.vocab_size` embedding rows."""

    def __init__(self, json: str, spec: TokenizerSpec):
        self.json, self.spec = json, spec
        try:
            self._tokenizer = Tokenizer.from_str(json)
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise TokenizerError(f"not a tokenizer file: {e}") from None
        if self._tokenizer.get_vocab_size() > spec.vocab_size:
            raise TokenizerError(f"the tokenizer has {self._tokenizer.get_vocab_size()} tokens, more than the "
                                 f"job's vocabulary of {spec.vocab_size}")

    @property
    def vocab_size(self) -> int:
        """The job's vocabulary (the model's embedding rows); every id the tokenizer produces is below it."""
        return self.spec.vocab_size

    @property
    def trained_size(self) -> int:
        """The tokens training reached: `vocab_size` or, on a small corpus, fewer."""
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that do not complete a character become U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_bytes(self, data: bytes) -> bytes:
        """Corpus bytes (UTF-8 text) as token ids in the wire format of the job's vocabulary (shared/tokens.py)."""
        ids = array("H")
        for encoding in self._tokenizer.encode_batch_fast(_pieces(_text(data))):  # ids only: no offsets (2x faster)
            ids.extend(encoding.ids)
        return write_tokens(ids, self.spec.vocab_size)


JobTokenizer = ByteTokenizer | BpeTokenizer


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def job_tokenizer(data_dir: str | Path, vocab_size: int | None = None) -> JobTokenizer:
    """The tokenizer of the job in `data_dir`: its BPE (TOKENIZER_FILE) or, for a job without one, bytes.

    `vocab_size` is the model's embedding rows, from its config or checkpoint (default: the tokens the BPE has); a
    vocabulary larger than bytes' needs the tokenizer file. Raises TokenizerError.
    """
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.exists():
        if vocab_size is not None and vocab_size > BYTE_VOCAB:
            raise TokenizerError(f"a model of {vocab_size} tokens needs its job's {path}, which is missing")
        return ByteTokenizer()
    json = path.read_text(encoding="utf-8")
    if vocab_size is None:
        try:
            vocab_size = Tokenizer.from_str(json).get_vocab_size()
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise TokenizerError(f"{path} is not a tokenizer file: {e}") from None
    return BpeTokenizer(json, TokenizerSpec("bpe", vocab_size))


def job_corpus(store: Store, data_dir: Path, corpus: Corpus, job: JobConfig) -> Corpus:
    """The corpus as the job's token ids. Bytes: `corpus` itself. BPE: on the job's first start the tokenizer is
    trained on the training text, written to `data_dir`/TOKENIZER_FILE and recorded in the store (spec, sha256);
    on a restart that file is read and checked. Both parts are then encoded (train and validation, so validation
    text the tokenizer never saw is measured the way nodes' text is)."""
    spec = parse_tokenizer(job.tokenizer)
    if spec.kind == "bytes":
        return corpus
    path = data_dir / TOKENIZER_FILE
    known = store.get_meta(TOKENIZER_META)
    if known is None:
        json = train_bpe(corpus.train, spec.vocab_size)
        data_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json)
        tokenizer = BpeTokenizer(json, spec)
        store.set_meta(TOKENIZER_META, {"spec": str(spec), "sha256": _sha256(json), "tokens": tokenizer.trained_size})
    else:
        if known.get("spec") != str(spec):
            raise TokenizerError(f"{data_dir} records tokenizer {known.get('spec')!r} but its job says {spec}")
        if not path.exists():
            raise TokenizerError(f"{path} is missing: this job's model reads ids of that tokenizer. Restore the file "
                                 "or start a new job in another --data-dir")
        json = path.read_text(encoding="utf-8")
        if _sha256(json) != known.get("sha256"):
            raise TokenizerError(f"{path} is not the tokenizer this job was created with (sha256 differs). Restore "
                                 "the file or start a new job in another --data-dir")
        tokenizer = BpeTokenizer(json, spec)
    return replace(corpus, train=tokenizer.encode_bytes(corpus.train),
                   validation=tokenizer.encode_bytes(corpus.validation), vocab_size=spec.vocab_size)

