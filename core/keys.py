"""Tollgate API keys: lookup in constant time, and masking for anything a human may read."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class HasSecret(Protocol):
    @property
    def secret(self) -> str: ...


K = TypeVar("K", bound=HasSecret)


def mask_key(secret: str) -> str:
    """`sk-…abcd`: enough to recognise a key in a log or a page, never enough to use it."""
    prefix = secret.split("-", 1)[0] + "-" if "-" in secret[:8] else ""
    return f"{prefix}…{secret[-4:]}" if len(secret) > 8 else "…"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyIndex(Generic[K]):
    """Find a key by its secret without a timing side channel.

    With thousands of keys, comparing the candidate against each one is too slow, and a plain
    dict lookup on the secret leaks prefix timing. Hashing first makes the dict lookup work on a
    digest the caller cannot steer, and the final `compare_digest` is constant time.
    """

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Iterable[K]):
        self._by_digest: dict[bytes, K] = {_digest(key.secret): key for key in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def clear(self) -> None:
        """Forget every key (a retired config being taken apart)."""
        self._by_digest.clear()

    def find(self, presented: str) -> K | None:
        key = self._by_digest.get(_digest(presented))
        if key is None or not hmac.compare_digest(key.secret.encode(), presented.encode("utf-8", "surrogatepass")):
            return None
        return key
