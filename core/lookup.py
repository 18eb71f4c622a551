"""Name tables matched exactly, then by longest prefix, then `default`.

Prices and timeouts are keyed by model name this way, so `gpt-4o-mini` never takes
`gpt-4o`'s entry by accident when it has its own. Built once per config load; lookups are
memoised because the set of model names a gateway sees is small.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT = "default"


class PrefixTable(Generic[T]):
    """Immutable name → value table with exact / longest-prefix / default resolution."""

    __slots__ = ("_default", "_exact", "_memo", "_prefixes")

    def __init__(self, entries: Mapping[str, T]):
        self._exact: dict[str, T] = {k: v for k, v in entries.items() if k != DEFAULT}
        self._prefixes = sorted(self._exact, key=len, reverse=True)
        self._default: T | None = entries.get(DEFAULT)
        self._memo: dict[str, tuple[T | None, str | None]] = {}

    def __len__(self) -> int:
        return len(self._exact) + (self._default is not None)

    def match(self, name: str) -> tuple[T | None, str | None]:
        """Return (value, matched key) where key is the table entry that matched, or (None, None)."""
        hit = self._memo.get(name)
        if hit is None:
            hit = self._resolve(name)
            if len(self._memo) < 65536:
                self._memo[name] = hit
        return hit

    @property
    def default(self) -> T | None:
        return self._default

    def get(self, name: str) -> T | None:
        return self.match(name)[0]

    def _resolve(self, name: str) -> tuple[T | None, str | None]:
        if name in self._exact:
            return self._exact[name], name
        for prefix in self._prefixes:
            if name.startswith(prefix):
                return self._exact[prefix], prefix
        if self._default is not None:
            return self._default, DEFAULT
        return None, None
