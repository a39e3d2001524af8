"""Node identity and the exact bytes that get signed: node ids are raw ed25519 public keys in hex.

Signing and verifying happen outside shared/ (`cryptography` in CPython, WebCrypto in the browser); this module
only fixes the canonical bytes so that every peer signs and checks the same thing. Never sign floats or
anything whose JSON text could differ between implementations without going through `canonical_json`.
"""

from __future__ import annotations

import json
import re

DOMAIN = b"swarmgrad/v1/"
NODE_ID_HEX_LEN = 64  # 32-byte ed25519 public key
SIGNATURE_HEX_LEN = 128  # 64-byte ed25519 signature
_HEX = re.compile(r"^[0-9a-f]*$")


class IdentityError(ValueError):
    """A node id or signature is not well formed."""


def validate_node_id(node_id: object) -> str:
    """Return `node_id` if it is 64 lowercase hex characters (an ed25519 public key), else raise IdentityError."""
    if not isinstance(node_id, str) or len(node_id) != NODE_ID_HEX_LEN or not _HEX.match(node_id):
        raise IdentityError(f"node id must be {NODE_ID_HEX_LEN} lowercase hex characters (an ed25519 public key)")
    return node_id


def validate_signature_hex(signature: object) -> bytes:
    if not isinstance(signature, str) or len(signature) != SIGNATURE_HEX_LEN or not _HEX.match(signature):
        raise IdentityError(f"signature must be {SIGNATURE_HEX_LEN} lowercase hex characters")
    return bytes.fromhex(signature)


def canonical_json(obj: object) -> bytes:
    """JSON with sorted keys, no spaces and ASCII only: the same bytes from the same value in any peer."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signing_bytes(purpose: str, fields: dict) -> bytes:
    """The bytes to sign for a message of `purpose` (e.g. "hello", "update"): a domain prefix keeps a signature
    for one purpose from being replayed as another."""
    if not purpose.isidentifier():
        raise IdentityError(f"bad signing purpose {purpose!r}")
    return DOMAIN + purpose.encode() + b"\n" + canonical_json(fields)
