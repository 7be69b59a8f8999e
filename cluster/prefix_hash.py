"""Prefix-cache keys, shared by the engine (its cache) and the routers (their prefix hints).

A full block of KV is keyed by a SHA-256 chained over its predecessor's digest and its token
ids, so equal digests mean equal token prefixes under the same cache salt. A cryptographic
hash because a cache hit is never checked against the tokens: with a weak one (Python's
`hash` of a tuple, unsalted), a client could compute a prompt that collides with another
client's prefix and be served its KV (vLLM's CVE-2025-25183 was the same).

No torch here: the routers run in CPU-node processes.
"""

from __future__ import annotations

import hashlib
from array import array


def salt_digest(salt: str = "") -> bytes:
    """The chain's start: requests with different salts (tenants) never share a block."""
    return hashlib.sha256(b"tandem-kv\0" + salt.encode()).digest() if salt else b""


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    """The digest of a full block that follows a prefix whose digest is prev."""
    return hashlib.sha256(prev + array("q", tokens).tobytes()).digest()


def short_digest(h: bytes) -> int:
    """The first 8 bytes: what replicas report to routers (a routing hint, never a key)."""
    return int.from_bytes(h[:8], "little")


def prompt_digests(token_ids: list[int], block_size: int, salt: str = "") -> list[int]:
    """The short digests a replica's prefix cache would report for this prompt's blocks."""
    out, h = [], salt_digest(salt)
    for i in range(len(token_ids) // block_size):
        h = block_hash(h, token_ids[i * block_size : (i + 1) * block_size])
        out.append(short_digest(h))
    return out
