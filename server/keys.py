"""ed25519 keys for CPython peers (the coordinator and trainers), with `cryptography`.

Node ids and signed bytes are defined in shared/identity.py; this module only holds keys and does the math.
Never log or send a private key; key files are written with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.identity import validate_node_id, validate_signature_hex


class SignatureError(ValueError):
    """A signature does not verify for the claimed node id."""


class NodeKey:
    """A private ed25519 key; `node_id` is its public key in hex."""

    def __init__(self, private: Ed25519PrivateKey | None = None):
        self._private = private or Ed25519PrivateKey.generate()
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.node_id = raw.hex()

    def sign(self, data: bytes) -> str:
        return self._private.sign(data).hex()

    @classmethod
    def load_or_create(cls, path: Path) -> "NodeKey":
        """The key stored at `path` (32 raw bytes), created there first if missing."""
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ValueError(f"key file {path} must hold 32 bytes, has {len(raw)}")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        key = cls()
        raw = key._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return key


def verify(node_id: str, data: bytes, signature_hex: str) -> None:
    """Raise SignatureError unless `signature_hex` is `node_id`'s signature over `data`."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(validate_node_id(node_id)))
        public.verify(validate_signature_hex(signature_hex), data)
    except (InvalidSignature, ValueError) as e:
        raise SignatureError(f"signature by {node_id[:12]}… does not verify") from e
