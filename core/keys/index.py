"""Tollgate API keys: lookup in constant time, and masking for anything a human may read."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class HasDigest(Protocol):
    """A key as the index sees it: the digest of its secret, and of the secret it replaced
    while that one still works (a rotation's grace period)."""

    @property
    def digest(self) -> bytes: ...

    @property
    def previous_digest(self) -> bytes | None: ...

    @property
    def previous_until(self) -> float: ...


K = TypeVar("K", bound=HasDigest)


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


def digest_of(secret: str) -> bytes:
    """What a key's secret is known by: keys made through the API are stored only as this."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyIndex(Generic[K]):
    """Find a key by its secret without a timing side channel.

    With thousands of keys, comparing the candidate against each one is too slow, and a plain
    dict lookup on the secret leaks prefix timing. Hashing first makes the dict lookup work on a
    digest the caller cannot steer, and the final `compare_digest` is constant time. Only
    digests are needed, so keys made through the API never have their secret stored.
    """

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Iterable[K]):
        self._by_digest: dict[bytes, K] = {}
        keys = list(keys)
        for key in keys:  # a secret replaced by a rotation, until its grace period ends
            if key.previous_digest is not None:
                self._by_digest[key.previous_digest] = key
        for key in keys:  # current secrets win over any previous one
            self._by_digest[key.digest] = key

    def __len__(self) -> int:
        return len(self._by_digest)

    def clear(self) -> None:
        """Forget every key (a retired config being taken apart)."""
        self._by_digest.clear()

    def find(self, presented: str, now: float | None = None) -> K | None:
        digest = digest_of(presented)
        key = self._by_digest.get(digest)
        if key is None:
            return None
        if hmac.compare_digest(key.digest, digest):
            return key
        previous = key.previous_digest
        if previous is not None and hmac.compare_digest(previous, digest) and (time.time() if now is None else now) < key.previous_until:
            return key
        return None
