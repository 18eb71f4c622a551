"""Brute-force protection: failed authentications are counted per client address.

Past `auth_failure_limit` failures in a minute, that address is refused with a 429 until
the minute is over, whatever key it presents next; other addresses are not affected. A
request that authenticates costs one dict lookup (usually a miss) here.

The count is this process's own. In a fleet of N instances behind a load balancer each
allows its share, limit / N (rounded up), so an address spreading its attempts over every
instance still gets about `limit` per minute in all, without a database write per failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from core.errors import GatewayError

WINDOW_SECONDS = 60
MAX_TRACKED_ADDRESSES = 100_000  # a flood of addresses cannot grow the table without bound


class AuthThrottle:
    __slots__ = ("_clock", "_failures", "_shares")

    def __init__(self, clock: Callable[[], float], shares: Callable[[], int] = lambda: 1):
        self._clock = clock
        self._shares = shares  # how many instances share the limit (fleet mode: the live ones)
        self._failures: dict[str | None, tuple[int, int]] = {}  # address -> (window number, failures)

    def _share(self, limit: int) -> int:
        return -(-limit // max(1, self._shares()))

    def check(self, address: str | None, limit: int) -> None:
        """Refuse an address that used up its failures for this minute."""
        entry = self._failures.get(address)
        if entry is None or limit <= 0:
            return
        now = self._clock()
        window, failures = entry
        if window != int(now // WINDOW_SECONDS):
            del self._failures[address]
        elif failures >= self._share(limit):
            retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
            raise GatewayError(
                429,
                "rate_limit_error",
                "too_many_auth_failures",
                f"Too many failed authentications from this address; try again in {retry_after}s.",
                {"Retry-After": str(retry_after)},
            )

    def failed(self, address: str | None, limit: int) -> None:
        if limit <= 0:
            return
        window = int(self._clock() // WINDOW_SECONDS)
        entry = self._failures.get(address)
        failures = entry[1] + 1 if entry is not None and entry[0] == window else 1
        if entry is None and len(self._failures) >= MAX_TRACKED_ADDRESSES:
            self._forget_before(window)
        self._failures[address] = (window, failures)

    def _forget_before(self, window: int) -> None:
        stale = [address for address, (seen, _) in self._failures.items() if seen != window]
        for address in stale or list(self._failures)[: MAX_TRACKED_ADDRESSES // 10]:
            del self._failures[address]
