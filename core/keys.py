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


MASK_SHOWN = 9  # characters of a long secret shown: enough to tell keys apart, far too few to use one
MASK_TAIL = 4


def mask_key(secret: str) -> str:
    """`sk-us…2f9a`: the secret's ends, to recognise a key in a log or a page. Never more than
    a third of the secret, so a short one shows less (`sk-…me`); pages add the key's id."""
    shown = min(len(secret) // 3, MASK_SHOWN)
    if shown < 2:
        return "…"
    tail = min(MASK_TAIL, shown // 2)
    return f"{secret[: shown - tail]}…{secret[-tail:]}"


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
