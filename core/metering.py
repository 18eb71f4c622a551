"""The seam billing plugs into: admit a request before the upstream call, settle it after.

`admit` may refuse (raise GatewayError) and returns a `Ticket`. The ticket ends once, by
`settle` or `release`, when the outcome is known: after the upstream answer, at the end of
a stream, on client disconnect, or when every provider failed. The first of the two ends
it and any later call does nothing, so a caller can `release()` in a `finally` after
settling and every admitted request still ends exactly once, whatever raised on the way.
Both are synchronous so they can run while a cancelled stream unwinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from core.usage import Usage

if TYPE_CHECKING:
    from core.config import ApiKey, Config
    from core.ledger import UsageRecord
    from core.proxy import ProxyRequest

OK = "ok"
ERROR = "error"
CLIENT_DISCONNECTED = "client_disconnected"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened upstream, as billing needs to know it."""

    provider: str
    upstream_model: str
    usage: Usage
    status: str  # OK | ERROR | CLIENT_DISCONNECTED


class Ticket(Protocol):
    def settle(self, outcome: Outcome) -> dict[str, str]:
        """Charge the outcome; return response headers describing the charge. Does nothing
        once the ticket has ended."""
        ...

    def release(self) -> None:
        """Nothing was delivered: charge nothing and free the reservation. Does nothing once
        the ticket has ended (so it is safe in a `finally` after `settle`)."""
        ...

    def start_headers(self) -> dict[str, str]:
        """Headers known at admission (rate limits, quota), for responses sent before settling."""
        ...

    # The ledger row the ticket was charged by, once settled (None: not charged, or released).
    settled: UsageRecord | None

    # Seconds between progress reports of a long stream (None: this meter wants none).
    report_every: float | None

    def report(self, outcome: Outcome) -> None:
        """What a stream in progress has used so far: should this process die before it
        settles, the fleet bills that much (the ticket does not end)."""
        ...


class Meter(Protocol):
    async def admit(self, config: Config, key: ApiKey, request: ProxyRequest) -> Ticket: ...

    async def admit_free(self, key: ApiKey, request: ProxyRequest) -> Ticket:
        """A request answered free of charge: limits checked and counted, no balance held."""
        ...
