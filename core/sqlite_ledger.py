"""The embedded ledger: SQLite in WAL mode, one writer task with group commit.

Balances live in memory (`Account`) and are rebuilt from the tables the first time a key
is used after start. Usage rows are queued and written in batches off the request path;
grants wait for their commit so an admin sees a durable top-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from core.config_billing import KeyBilling
from core.ledger import COUNT_CREDITS, CREDITS, Account, Grant, InsufficientBalance, Reservation, UsageRecord

log = logging.getLogger("tollgate.ledger")

MAX_BATCH = 2000
SCHEMA_VERSION = 1
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_type TEXT NOT NULL,
        unit_prices TEXT NOT NULL,
        cost_nanos INTEGER NOT NULL,
        count_charged INTEGER NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX usage_by_key_time ON usage (key_id, ts);
    CREATE INDEX usage_by_time ON usage (ts);
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('credits', 'count_credits')),
        amount INTEGER NOT NULL CHECK (amount > 0),
        reason TEXT NOT NULL,
        idempotency_key TEXT,
        ts REAL NOT NULL
    );
    CREATE INDEX grants_by_key_time ON grants (key_id, ts);
    CREATE UNIQUE INDEX grants_idempotency ON grants (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    """,
}

_INSERT_USAGE = """INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens,
    completion_tokens, cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_INSERT_GRANT = "INSERT OR IGNORE INTO grants (key_id, kind, amount, reason, idempotency_key, ts) VALUES (?, ?, ?, ?, ?, ?)"


class LedgerUnavailable(Exception):
    pass


@dataclass(slots=True)
class _Recount:
    """Rebuild one account from the tables, in queue order: every row queued before this
    marker is committed and counted by the query, every row queued after it is not."""

    account: Account
    charges_when_queued: tuple[int, int, int, int]
    done: asyncio.Future[None]


@dataclass(slots=True)
class _GrantItem:
    grant: Grant
    account: Account
    done: asyncio.Future[bool]


_QueueItem = UsageRecord | _GrantItem | _Recount | asyncio.Future  # a bare future is a flush marker


class SqliteLedger:
    def __init__(self, db: aiosqlite.Connection):
        self.db = db
        self._accounts: dict[str, Account] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | Path) -> SqliteLedger:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await _migrate(db)
        except Exception as exc:
            await db.close()
            raise LedgerUnavailable(f"cannot open the ledger database {path}: {exc}") from exc
        ledger = cls(db)
        ledger._writer = asyncio.create_task(ledger._write_loop())
        return ledger

    # --- balances ---------------------------------------------------------------------

    async def account(self, key_id: str, terms: KeyBilling) -> Account:
        """The key's account for its current billing window, rebuilt from the tables on
        first use and when the window (`created_at`) changes. The object is never replaced,
        so reservations held by requests in flight stay attached to it."""
        account = self._accounts.get(key_id)
        if account is None:
            account = self._accounts[key_id] = Account(key_id, terms.created_at)
            self._recount(account)
        elif account.window_start != terms.created_at:
            account.window_start = terms.created_at
            self._recount(account)
        ready = self._ready[key_id]
        if not ready.done():
            await asyncio.shield(ready)
        ready.result()  # re-raise a failed recount
        return account

    def _recount(self, account: Account) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready[account.key_id] = done
        self._queue.put_nowait(_Recount(account, account.charges(), done))

    async def reserve(self, key_id: str, terms: KeyBilling, nanos: int, count: int) -> Reservation:
        account = await self.account(key_id, terms)
        # From here to the end there is no await: check and hold are one step on the loop.
        if count and account.remaining_count(terms) - account.reserved_count < count:
            raise InsufficientBalance(COUNT_CREDITS)
        remaining = account.remaining_nanos(terms)
        if remaining is not None and not count and (remaining <= 0 or remaining - account.reserved_nanos < nanos):
            raise InsufficientBalance(CREDITS)
        account.reserved_nanos += nanos
        account.reserved_count += count
        return Reservation(account, nanos, count)

    def settle(self, reservation: Reservation, record: UsageRecord) -> None:
        self._unhold(reservation)
        account = reservation.account
        if record.cost_type == "token":
            account.spent_nanos += record.cost_nanos
        account.count_used += record.count_charged
        account.total_cost_nanos += record.cost_nanos
        account.request_count += 1
        self._queue.put_nowait(record)

    def release(self, reservation: Reservation, record: UsageRecord | None = None) -> None:
        self._unhold(reservation)
        if record is not None:
            reservation.account.request_count += 1
            self._queue.put_nowait(record)

    @staticmethod
    def _unhold(reservation: Reservation) -> None:
        if reservation.open:
            reservation.open = False
            reservation.account.reserved_nanos -= reservation.nanos
            reservation.account.reserved_count -= reservation.count

    async def grant(self, grant: Grant, terms: KeyBilling) -> bool:
        """Durable before it returns; the balance grows when the grant commits."""
        account = await self.account(grant.key_id, terms)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_GrantItem(grant, account, done))
        return await done

    # --- writing ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self._writer is None or self._writer.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        await done

    async def close(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        await self.db.close()

    async def _write_loop(self) -> None:
        """Group commit: everything queued while the last batch was written goes in one
        transaction. Items are handled strictly in queue order."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            pending: list[UsageRecord | _GrantItem] = []
            for item in batch:
                if isinstance(item, (UsageRecord, _GrantItem)):
                    pending.append(item)
                    continue
                await self._commit_with_retry(pending)
                pending = []
                if isinstance(item, _Recount):
                    await self._run_recount(item)
                elif not item.done():
                    item.set_result(None)
            await self._commit_with_retry(pending)

    async def _commit_with_retry(self, items: list[UsageRecord | _GrantItem]) -> None:
        """On a failure (disk full, locked file) keep the rows and try again: the requests
        have their answers already, and their charges stay in memory meanwhile."""
        if not items:
            return
        delay = 0.05
        while True:
            try:
                applied = await self._commit(items)
                break
            except Exception:
                log.exception("ledger write of %d rows failed; retrying in %.2fs", len(items), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for item, was_applied in zip((i for i in items if isinstance(i, _GrantItem)), applied, strict=True):
            grant, account = item.grant, item.account
            if was_applied and grant.ts >= account.window_start:
                if grant.kind == CREDITS:
                    account.granted_nanos += grant.amount
                else:
                    account.count_granted += grant.amount
            if not item.done.done():
                item.done.set_result(was_applied)

    async def _commit(self, items: list[UsageRecord | _GrantItem]) -> list[bool]:
        usage = [_usage_row(item) for item in items if isinstance(item, UsageRecord)]
        applied = []
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            if usage:
                await self.db.executemany(_INSERT_USAGE, usage)
            for item in items:
                if isinstance(item, _GrantItem):
                    g = item.grant
                    cursor = await self.db.execute(_INSERT_GRANT, (g.key_id, g.kind, g.amount, g.reason, g.idempotency_key, g.ts))
                    applied.append(cursor.rowcount == 1)
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise
        return applied

    async def _run_recount(self, item: _Recount) -> None:
        account = item.account
        try:
            charges, grants = await self._sums(account.key_id, account.window_start)
        except Exception as exc:
            log.exception("rebuilding the balance of key %s from the ledger failed", account.key_id[:8])
            if not item.done.done():
                item.done.set_exception(exc)
            self._accounts.pop(account.key_id, None)
            return
        # Settlements queued after the marker are already in memory but not in the sums.
        since_marker = [now - then for now, then in zip(account.charges(), item.charges_when_queued, strict=True)]
        account.set_charges(tuple(total + delta for total, delta in zip(charges, since_marker, strict=True)))  # type: ignore[arg-type]
        account.granted_nanos, account.count_granted = grants
        if not item.done.done():
            item.done.set_result(None)

    async def _sums(self, key_id: str, since: float) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        async with self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN cost_type = 'token' THEN cost_nanos END), 0), COALESCE(SUM(count_charged), 0),"
            " COALESCE(SUM(cost_nanos), 0), COUNT(*) FROM usage WHERE key_id = ? AND ts >= ?",
            (key_id, since),
        ) as cursor:
            charges = await cursor.fetchone()
        async with self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN kind = 'credits' THEN amount END), 0), COALESCE(SUM(CASE WHEN kind = 'count_credits' THEN amount END), 0)"
            " FROM grants WHERE key_id = ? AND ts >= ?",
            (key_id, since),
        ) as cursor:
            grants = await cursor.fetchone()
        assert charges is not None and grants is not None
        return (charges[0], charges[1], charges[2], charges[3]), (grants[0], grants[1])

    # --- reading ------------------------------------------------------------------------

    async def usage_by_model(self, key_id: str, since: float, until: float | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """Per model and cost type: requests, tokens and cost (nanos) for one key."""
        await self.flush()
        sql = (
            "SELECT model, cost_type, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(cost_nanos), SUM(count_charged)"
            " FROM usage WHERE key_id = ? AND ts >= ?"
        )
        params: list[Any] = [key_id, since]
        if until is not None:
            sql += " AND ts < ?"
            params.append(until)
        if model is not None:
            sql += " AND model = ?"
            params.append(model)
        sql += " GROUP BY model, cost_type ORDER BY model, cost_type"
        async with self.db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        names = ("model", "cost_type", "request_count", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nanos", "count_charged")
        return [dict(zip(names, row, strict=True)) for row in rows]


def _usage_row(record: UsageRecord) -> tuple[Any, ...]:
    row = list(astuple(record))
    row[11] = json.dumps(record.unit_prices, separators=(",", ":"))
    return tuple(row)


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        (version,) = await cursor.fetchone()  # type: ignore[misc]
    if version > SCHEMA_VERSION:
        raise LedgerUnavailable(f"database schema version {version} is newer than this Tollgate ({SCHEMA_VERSION})")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
