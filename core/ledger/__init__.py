"""The ledger interface: reserve → settle/release, grants, and balances.

Routes and billing talk only to this interface. The embedded implementation is SQLite
(core/ledger/sqlite.py); a PostgreSQL one for several gateway processes implements the
same calls with an atomic `UPDATE … WHERE remaining >= $1 RETURNING`.

Amounts are integer nano-dollars (core.pricing) and whole count credits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from core.config_billing import KeyBilling

CREDITS = "credits"
COUNT_CREDITS = "count_credits"


class InsufficientBalance(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind  # CREDITS or COUNT_CREDITS


@dataclass(slots=True)
class Account:
    """One key's money as the ledger says it, within the key's billing window, plus what
    requests in flight have reserved. Lives in memory for the hot path."""

    key_id: str
    window_start: float
    spent_nanos: int = 0  # token-billed charges
    count_used: int = 0
    total_cost_nanos: int = 0  # every charge, count-billed ones included
    request_count: int = 0
    tokens_used: int = 0  # prompt + completion tokens: what a token quota counts
    granted_nanos: int = 0
    count_granted: int = 0
    reserved_nanos: int = 0
    reserved_count: int = 0

    def charges(self) -> tuple[int, int, int, int, int]:
        """The fields that settlements change."""
        return (self.spent_nanos, self.count_used, self.total_cost_nanos, self.request_count, self.tokens_used)

    def set_charges(self, values: tuple[int, int, int, int, int]) -> None:
        self.spent_nanos, self.count_used, self.total_cost_nanos, self.request_count, self.tokens_used = values

    def in_window(self, ts: float) -> bool:
        """The one rule for what a balance counts: charges, releases and grants timed from
        the window's start (`created_at`) on, in memory exactly as at rebuild."""
        return ts >= self.window_start

    def remaining_nanos(self, terms: KeyBilling) -> int | None:
        if terms.credits_nanos is None:
            return None
        return terms.credits_nanos + self.granted_nanos - self.spent_nanos

    def remaining_count(self, terms: KeyBilling) -> int:
        return terms.count_credits + self.count_granted - self.count_used


@dataclass(slots=True)
class Reservation:
    account: Account
    nanos: int
    count: int
    open: bool = True


class UsageRecord(NamedTuple):
    """One row of the request log: what was used, at which unit prices, for how much.

    A named tuple in the `usage` table's column order: made on every request and written
    as it is, with no conversion (a frozen dataclass cost a setattr per field).
    """

    request_id: str
    ts: float
    key_id: str
    key_name: str
    model: str
    provider: str
    upstream_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_type: str
    unit_prices: str = "{}"  # JSON: the unit prices this charge used (history is never repriced)
    cost_nanos: int = 0
    count_charged: int = 0
    status: str = "ok"
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    key_id: str
    kind: str  # CREDITS (nanos) or COUNT_CREDITS (whole credits)
    amount: int
    reason: str
    idempotency_key: str | None
    ts: float


class Ledger(Protocol):
    async def account(self, key_id: str, terms: KeyBilling) -> Account: ...

    async def reserve(self, key_id: str, terms: KeyBilling, nanos: int, count: int) -> Reservation:
        """Hold `nanos` of USD credit and `count` count credits, or raise InsufficientBalance."""
        ...

    def hold(self, account: Account, terms: KeyBilling, nanos: int, count: int) -> Reservation:
        """`reserve` for an account already at hand, without awaiting: lets billing check
        several limits and hold them all in one step."""
        ...

    def settle(self, reservation: Reservation, record: UsageRecord) -> int:
        """Release the hold and charge the record; durable at the next group commit.
        Returns the record's position in the write order."""
        ...

    def release(self, reservation: Reservation, record: UsageRecord | None = None) -> int:
        """Release the hold without charging (a zero-cost record may still be logged)."""
        ...

    async def grant(self, grant: Grant, terms: KeyBilling) -> bool:
        """Add credit; False when the idempotency key was used before (nothing applied)."""
        ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
