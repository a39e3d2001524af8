"""The training text: bytes of a corpus split into a train part (cut into shards) and a held-out validation part;
for a BPE job (server/tokenizer.py) both parts hold token ids instead, in shared/tokens.py's wire format.

The default corpus is the Python standard library's own source, found through sysconfig, so a coordinator
needs nothing from the network. Never read files outside the corpus root that the user named.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from shared.tokens import BYTE_VOCAB, token_width

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # enough text for many rounds; keeps start-up under a second
SHARD_BYTES = 64 * 1024  # a multiple of every token width: a shard never cuts a token id in two
VALIDATION_EVERY = 20  # one file in VALIDATION_EVERY (chosen by a hash of its path) is held out


class CorpusError(Exception):
    """The corpus could not be read or is too small to train on."""


@dataclass(frozen=True)
class Corpus:
    name: str
    train: bytes
    validation: bytes
    vocab_size: int = BYTE_VOCAB  # what train and validation hold: ids of this vocabulary (bytes up to 256)

    def __post_init__(self) -> None:
        width = token_width(self.vocab_size)
        if len(self.train) % width or len(self.validation) % width:
            raise CorpusError(f"token data of a {self.vocab_size}-token vocabulary must hold whole {width}-byte ids")

    @property
    def num_shards(self) -> int:
        return max(1, len(self.train) // SHARD_BYTES)

    def shard(self, index: int) -> bytes:
        """Training shard `index` (wraps around, so any non-negative index is valid)."""
        if index < 0:
            raise IndexError("shard index must be non-negative")
        i = index % self.num_shards
        return self.train[i * SHARD_BYTES : (i + 1) * SHARD_BYTES]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.train + b"\0" + self.validation).hexdigest()


def _is_validation(rel_path: str) -> bool:
    return hashlib.sha256(rel_path.encode()).digest()[0] % VALIDATION_EVERY == 0


def load_corpus(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES, min_bytes: int = 4096) -> Corpus:
    """Load the user's text (a file, or a directory of *.txt/*.md/*.py files) or, with no path, the stdlib source.

    A single file is split by position (the last 5% is validation); a directory by file.
    """
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
        name = f"python-stdlib ({root})"
    else:
        root = Path(path)
        if not root.exists():
            raise CorpusError(f"corpus path {root} does not exist")
        if root.is_file():
            data = root.read_bytes()[:max_bytes]
            if len(data) < min_bytes:
                raise CorpusError(f"corpus {root} has {len(data)} bytes; need at least {min_bytes}")
            cut = len(data) - max(len(data) // VALIDATION_EVERY, 1024)
            return Corpus(str(root), data[:cut], data[cut:])
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".txt", ".md", ".py", ".rst"})
        name = str(root)
    train, val = bytearray(), bytearray()
    val_budget = max(max_bytes // VALIDATION_EVERY, 1024)
    train_budget = max_bytes - val_budget
    for f in files:
        if len(train) >= train_budget and len(val) >= val_budget:
            break
        part, budget = (val, val_budget) if _is_validation(str(f.relative_to(root))) else (train, train_budget)
        if len(part) >= budget:
            continue
        try:
            part.extend(f.read_bytes()[: budget - len(part)])
        except OSError:
            continue  # an unreadable file in a corpus directory is skipped, not fatal
    if len(train) < min_bytes or len(val) < 1024:
        raise CorpusError(f"corpus {name} is too small: {len(train)} train and {len(val)} validation bytes")
    return Corpus(name, bytes(train), bytes(val))
