"""The ledger interface: admit → settle/release, grants, and balances.

Routes and billing talk only to this interface; which implementation runs is chosen at
start-up (`--database`). The embedded one is SQLite (sqlite.py): balances and limits are
held in the process's memory, so exactly one process may use a ledger file. The fleet one
is PostgreSQL (postgres.py): every admission is a transaction under the key's row lock, so
any number of processes and hosts may share it with the same guarantees.

Amounts are integer nano-dollars (core.pricing) and whole count credits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from core.config.billing import KeyBilling

if TYPE_CHECKING:
    from core.audit import AuditEntry
    from core.config import ApiKey
    from core.keys.records import AccountChange, AccountRecord, AccountRecords, KeyRecord, KeyRecords, RecordChange
    from core.ledger.sums import Totals, Window
    from core.limits import Limiter

T = TypeVar("T")

CREDITS = "credits"
COUNT_CREDITS = "count_credits"


class InsufficientBalance(Exception):
    """The balance cannot hold a request; for USD credit, what it had, for the 402's message."""

    def __init__(self, kind: str, balance_nanos: int = 0, held_nanos: int = 0):
        super().__init__(kind)
        self.kind = kind  # CREDITS or COUNT_CREDITS
        self.balance_nanos = balance_nanos  # credits + grants - charges (may be below zero)
        self.held_nanos = held_nanos  # of it, held by requests in flight


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
    # A key in an account: the account's own Account, which holds the balance (credits, grants,
    # reservations); this one still counts the key's own use (its quota, its history).
    owner: Account | None = None

    @property
    def holder(self) -> Account:
        """Whose balance this key draws on: its account's, or its own."""
        return self.owner if self.owner is not None else self

    def charges(self) -> tuple[int, int, int, int, int]:
        """The fields that settlements change."""
        return (self.spent_nanos, self.count_used, self.total_cost_nanos, self.request_count, self.tokens_used)

    def set_charges(self, values: tuple[int, int, int, int, int]) -> None:
        self.spent_nanos, self.count_used, self.total_cost_nanos, self.request_count, self.tokens_used = values

    def charge(self, record: UsageRecord) -> None:
        """Count a settled request's record in the balance, if it falls in the window (a
        reload may have moved the window past a request in flight), and in its account's."""
        if self.owner is not None:
            self.owner.charge(record)
        if self.in_window(record.ts):
            if record.cost_type == "token":
                self.spent_nanos += record.cost_nanos
            self.count_used += record.count_charged
            self.total_cost_nanos += record.cost_nanos
            self.request_count += 1
            self.tokens_used += record.prompt_tokens + record.completion_tokens

    def in_window(self, ts: float) -> bool:
        """The one rule for what a balance counts: charges, releases and grants timed from
        the window's start (`created_at`) on, in memory exactly as at rebuild."""
        return ts >= self.window_start

    def remaining_nanos(self, terms: KeyBilling) -> int | None:
        if terms.credits_nanos is None:
            return None
        holder = self.holder
        return terms.credits_nanos + holder.granted_nanos - holder.spent_nanos

    def remaining_count(self, terms: KeyBilling) -> int:
        holder = self.holder
        return terms.count_credits + holder.count_granted - holder.count_used


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds of its key's balance (and, through `holds`, of its
    limits in the embedded ledger; in the fleet ledger a database row named `request_id`)."""

    account: Account
    nanos: int
    count: int
    open: bool = True
    holds: Any = None  # core.limits.Holds, released with the reservation (embedded ledger)
    account_holds: Any = None  # the same for the limits of the key's account, if it has any
    request_id: str = ""
    tokens: int = 0
    admitted_at: float = 0.0
    holder: Account | None = None  # whose balance is held (an account's), fixed at admission

    def unhold(self) -> bool:
        """Give the held balance back to the account, once; whether it was still held."""
        if not self.open:
            return False
        self.open = False
        holder = self.holder or self.account
        holder.reserved_nanos -= self.nanos
        holder.reserved_count -= self.count
        return True


def hold(account: Account, terms: KeyBilling, nanos: int, count: int) -> Reservation:
    """Check and hold a balance in one synchronous step (nothing else runs in between):
    `count` count credits, or `nanos` of USD credit; InsufficientBalance when it lacks."""
    holder = account.holder  # a key in an account holds the account's balance
    if count and account.remaining_count(terms) - holder.reserved_count < count:
        raise InsufficientBalance(COUNT_CREDITS)
    remaining = account.remaining_nanos(terms)
    if remaining is not None and not count and (remaining <= 0 or remaining - holder.reserved_nanos < nanos):
        raise InsufficientBalance(CREDITS, remaining, holder.reserved_nanos)
    holder.reserved_nanos += nanos
    holder.reserved_count += count
    return Reservation(account, nanos, count, holder=holder)


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
    account_id: str = ""  # the account whose balance paid (`account:NAME`), or "" for a key's own
    images: int = 0  # the media endpoints' units (core/usage.py Usage)
    audio_ms: int = 0
    characters: int = 0
    # What the vendor charged the operator for this request (core.pricing.vendor), at the unit
    # prices recorded beside it; None: no vendor price is known (never shown as $0).
    vendor_cost_nanos: int | None = None
    vendor_unit_prices: str = ""


class StoredResponse(NamedTuple):
    """A response an upstream keeps (Responses API, `store` not false): who made it, and the
    provider that holds it, where every follow-up on it must go. A tuple in the
    `stored_responses` table's column order."""

    response_id: str
    key_id: str
    provider: str
    created_at: float


# OpenAI keeps a stored response for 30 days; the gateway remembers it as long, then forgets.
RESPONSE_RETENTION_SECONDS = 30 * 86400


@dataclass(frozen=True, slots=True)
class Grant:
    key_id: str
    kind: str  # CREDITS (nanos) or COUNT_CREDITS (whole credits)
    amount: int
    reason: str
    idempotency_key: str | None
    ts: float


class Ledger(Protocol):
    @property
    def limiter(self) -> Limiter:
        """The key limits' state as this process sees it (pages, headers, alerts)."""
        ...

    async def account(self, key_id: str, terms: KeyBilling) -> Account: ...

    async def accounts(self, keys: list[tuple[str, KeyBilling]]) -> dict[str, Account]: ...

    async def admit(self, key: ApiKey, nanos: int, balance_nanos: int, count: int, tokens: int, now: float, request_id: str) -> Reservation:
        """Check the key's limits (holding `nanos` against quotas and budgets and `tokens`
        against token rates) and its balance (`balance_nanos` of USD credit, `count` count
        credits), and hold them all in one step; raises a limit's GatewayError or
        InsufficientBalance."""
        ...

    def settle(self, reservation: Reservation, record: UsageRecord) -> int:
        """Release every hold and charge the record; durable at the next group commit."""
        ...

    def release(self, reservation: Reservation, record: UsageRecord | None = None) -> int:
        """Release every hold without charging (a zero-cost record may still be logged)."""
        ...

    # Seconds between a long stream's progress reports, or None when they serve nothing (one
    # process: if it dies, its requests die with it).
    report_every: float | None

    def report(self, reservation: Reservation, record: UsageRecord) -> None:
        """Keep what a request in flight has used so far with its reservation: should this
        process die, whoever frees the reservation bills that much."""
        ...

    async def grant(self, grant: Grant, terms: KeyBilling) -> bool:
        """Add credit; False when the idempotency key was used before (nothing applied)."""
        ...

    def remember_response(self, stored: StoredResponse) -> None:
        """Record who made a stored response and where it is held; queued like a charge and
        durable at the next group commit (entries older than RESPONSE_RETENTION_SECONDS go)."""
        ...

    async def stored_response(self, response_id: str) -> StoredResponse | None:
        """The record of a stored response as the database has it (another instance's too)."""
        ...

    async def flush(self) -> None:
        """Wait until everything queued so far is written (what exact reads need first)."""
        ...

    async def close(self) -> None: ...

    # Reads for pages, reports and statements: the SQL in core/reports.py and sums.py runs on
    # both databases through `reader.execute(sql, params)`, aiosqlite's shape.
    reader: Any
    shared: bool  # True when several processes share the ledger (fleet mode)

    def query_in_order(self, query: Callable[[Any], Awaitable[T]]) -> tuple[int, asyncio.Future[T]]:
        """Run `query` on the ledger's connection once everything queued before it is written."""
        ...

    async def totals(self, windows: list[Window], by_model: bool = False) -> dict[tuple[str, ...], Totals]: ...

    def vendor_month(self, provider: str, since: float, until: float) -> tuple[int, asyncio.Future[int]]:
        """A provider's vendor cost in nano-dollars over [since, until) (a month: whole 15-minute
        slots of the provider rollup), read at a point of the write order like `query_in_order`;
        in fleet mode the figure every instance's charges move (core.vendors.months)."""
        ...

    async def grants_in(self, windows: list[Window]) -> dict[str, tuple[int, int]]: ...

    async def setting(self, name: str, make: Callable[[], str]) -> str: ...

    async def key_records(self) -> KeyRecords:
        """Every key made or changed through the keys API (core/keys/records.py)."""
        ...

    async def change_key_record(self, key_id: str, change: RecordChange) -> KeyRecord:
        """Store `change(stored record or None)` for the key, atomically and durably; raises
        RecordConflict when another record has the id or the secret."""
        ...

    async def account_records(self) -> AccountRecords:
        """Every account made or changed through the accounts API (core/keys/records.py)."""
        ...

    async def change_account_record(self, name: str, change: AccountChange) -> AccountRecord:
        """Store `change(stored record or None)` for the account, atomically and durably."""
        ...

    async def append_audit(self, entry: AuditEntry) -> None: ...

    async def audit_entries(self, limit: int, before_id: int | None = None, key_id: str | None = None) -> list[dict[str, Any]]: ...

    def health(self) -> dict[str, Any]: ...

    # Told of each group commit: its seconds (None: it failed, to be retried) and the rows
    # still waiting; the app points it at its metrics.
    on_commit: Callable[[float | None, int], None]
