"""The embedded ledger: SQLite in WAL mode, one writer task with group commit.

Balances live in memory (`Account`) and are rebuilt from the tables the first time a key
is used after start. Usage rows are queued and written in batches off the request path;
grants wait for their commit so an admin sees a durable top-up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core.audit import INSERT_AUDIT, AuditEntry, read_audit_page
from core.config import ACCOUNT_ID_PREFIX, ApiKey
from core.config.billing import KeyBilling
from core.errors import GatewayError
from core.keys.records import (
    INSERT_ACCOUNT,
    INSERT_RECORD,
    SELECT_ACCOUNTS,
    SELECT_RECORDS,
    UPDATE_ACCOUNT,
    UPDATE_RECORD,
    AccountChange,
    AccountRecord,
    AccountRecords,
    KeyRecord,
    KeyRecords,
    RecordChange,
    RecordConflict,
    account_from_row,
    account_row,
    account_update_params,
    record_from_row,
    record_row,
    update_params,
)
from core.ledger import CREDITS, RESPONSE_RETENTION_SECONDS, Account, Grant, InsufficientBalance, Reservation, StoredResponse, UsageRecord, hold
from core.ledger.rollups import ROLLUP_STATEMENTS
from core.ledger.sqlite_schema import SCHEMA_VERSION, migrate
from core.ledger.sums import Totals, Window, account_totals, grant_totals, window_totals
from core.limits import Limiter

log = logging.getLogger("tollgate.ledger")
T = TypeVar("T")

MAX_BATCH = 5000
GROUP_COMMIT_SECONDS = 0.01

_USAGE_COLUMNS = ", ".join(UsageRecord._fields)  # the record is a tuple in column order
# Usage rows go in as multi-row INSERTs of these sizes (a batch of 300 is 256 + 32 + 3 x 4).
# (256 rows x 23 columns stay far under SQLite's 32,766 bound parameters per statement.)
# executemany releases and retakes the GIL around every row: under load that is one contended
# hand-over between the database thread and the event loop per request (strace: ~1,400 futex
# calls/s at 2,400 requests/s). One statement per chunk makes it a handful per batch.
_USAGE_CHUNKS = (256, 32, 4, 1)
_USAGE_ROW = "(" + ", ".join("?" * len(UsageRecord._fields)) + ")"
_INSERT_USAGE = {n: f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES " + ", ".join([_USAGE_ROW] * n) for n in _USAGE_CHUNKS}
_INSERT_GRANT = "INSERT OR IGNORE INTO grants (key_id, kind, amount, reason, idempotency_key, ts) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_STORED = f"INSERT OR REPLACE INTO stored_responses ({', '.join(StoredResponse._fields)}) VALUES (?, ?, ?, ?)"
_SELECT_STORED = f"SELECT {', '.join(StoredResponse._fields)} FROM stored_responses WHERE response_id = ?"
_VENDOR_MONTH = "SELECT COALESCE(SUM(vendor_cost_nanos), 0) FROM usage_provider_slot WHERE provider = ? AND slot >= ? AND slot < ?"
PRUNE_EVERY_SECONDS = 3600.0  # how often a writer drops stored responses past their retention


MAX_RETRY_DELAY = 5.0  # seconds between attempts while the database refuses writes (disk full)
WRITE_CHECK_SECONDS = 0.25  # how often a reader waiting for the writer looks for a write error
CLOSE_WAIT_SECONDS = 60.0


class LedgerUnavailable(Exception):
    pass


def check_ledger_file(path: str | Path, lock_timeout: float = 5.0) -> None:
    """Refuse, with a clear reason, a ledger file that is not a SQLite database, is damaged
    where we can cheaply tell, is newer than this Tollgate, or is locked by another process:
    starting on it would either crash later or, worse, look like an empty ledger."""
    path = Path(path)
    if not path.exists():
        return  # a first start: the ledger is created
    try:
        db = sqlite3.connect(path, timeout=lock_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerUnavailable(f"cannot open the ledger database {path}: {exc}") from exc
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise LedgerUnavailable(f"the ledger database {path} has schema version {version}, newer than this Tollgate ({SCHEMA_VERSION})")
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > 0 and "usage" in tables:
            db.execute("SELECT MAX(id), COUNT(*) FROM (SELECT id FROM usage ORDER BY id DESC LIMIT 1000)").fetchone()
        db.execute("BEGIN IMMEDIATE")  # waits up to lock_timeout for another writer, then fails
        db.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        reason = "it is locked by another process" if "locked" in str(exc) else str(exc)
        raise LedgerUnavailable(f"cannot use the ledger database {path}: {reason}") from exc
    finally:
        db.close()


@dataclass(slots=True)
class _Recount:
    """Rebuild accounts from the tables, in queue order: every row queued before this
    marker is committed and counted by the query, every row queued after it is not."""

    accounts: list[tuple[Account, tuple[int, int, int, int, int]]]  # with their charges when queued
    done: asyncio.Future[None]


@dataclass(slots=True)
class _GrantItem:
    grant: Grant
    account: Account
    done: asyncio.Future[bool]


@dataclass(slots=True)
class _InOrder:
    """A read run by the writer at this point of the queue (see `query_in_order`)."""

    query: Callable[[aiosqlite.Connection], Awaitable[Any]]
    done: asyncio.Future[Any]


_Written = UsageRecord | _GrantItem | StoredResponse  # what a batch's transaction writes
_QueueItem = _Written | _Recount | _InOrder | asyncio.Future  # a bare future is a flush marker


class SqliteLedger:
    shared = False  # balances and limits live in this process: one process per ledger file

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, clock: Callable[[], float] = time.time):
        self.db = db  # the writer's connection: every write, and recounts in queue order
        self.reader = reader  # pages and reports read here, concurrently with writes (WAL)
        self._accounts: dict[str, Account] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._seq = 0  # position in the write queue of the last item queued
        self.write_error: str | None = None  # the last failed write while it is being retried
        self._retrying = 0  # rows held in memory by a write being retried
        # Told of each group commit: (seconds, or None when it failed; rows still unwritten).
        self.on_commit: Callable[[float | None, int], None] = _ignore_commit
        self.limiter = Limiter(self, clock)
        self._records_lock = asyncio.Lock()
        self._next_prune = 0.0  # when the writer next drops expired stored responses

    @classmethod
    async def open(cls, path: str | Path, clock: Callable[[], float] = time.time) -> SqliteLedger:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await migrate(db)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=ON")
        except Exception as exc:
            await db.close()
            raise LedgerUnavailable(f"cannot open the ledger database {path}: {exc}") from exc
        ledger = cls(db, reader, clock)
        ledger._writer = asyncio.create_task(ledger._write_loop())
        return ledger

    # --- balances ---------------------------------------------------------------------

    async def account(self, key_id: str, terms: KeyBilling) -> Account:
        """The key's account for its current billing window, rebuilt from the tables on
        first use and when the window (`created_at`) changes. The object is never replaced,
        so reservations held by requests in flight stay attached to it. A key in an account
        is linked to the account's own Account, which holds the shared balance."""
        account = self._accounts.get(key_id)
        if account is None or account.window_start != terms.created_at or _owner_id(account) != terms.owner:
            return (await self.accounts([(key_id, terms)]))[key_id]
        ready = self._ready[key_id]
        if not ready.done():
            await asyncio.shield(ready)
        ready.result()  # re-raise a failed recount
        if account.owner is not None:
            await self._ready_owner(account.owner.key_id)
        return account

    async def _ready_owner(self, owner_id: str) -> None:
        ready = self._ready[owner_id]
        if not ready.done():
            await asyncio.shield(ready)
        ready.result()

    async def accounts(self, keys: list[tuple[str, KeyBilling]]) -> dict[str, Account]:
        """Many accounts at once (a page of 10,000 keys): one recount query for all missing."""
        owners = {terms.owner: terms for _, terms in keys if terms.owner is not None}
        wanted = [*keys, *owners.items()]
        self._stale([(key_id, terms) for key_id, terms in wanted if (a := self._accounts.get(key_id)) is None or a.window_start != terms.created_at])
        for future in {id(f): f for f in (self._ready[key_id] for key_id, _ in wanted)}.values():
            if not future.done():
                await asyncio.shield(future)
            future.result()
        for key_id, terms in keys:
            self._accounts[key_id].owner = self._accounts[terms.owner] if terms.owner is not None else None
        return {key_id: self._accounts[key_id] for key_id, _ in keys}

    def _stale(self, keys: list[tuple[str, KeyBilling]]) -> list[Account]:
        """Set up accounts for new keys or new windows and queue one recount for them."""
        if not keys:
            return []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        marked = []
        for key_id, terms in keys:
            account = self._accounts.get(key_id)
            if account is None:
                account = self._accounts[key_id] = Account(key_id, terms.created_at)
            account.window_start = terms.created_at
            self._ready[key_id] = done
            marked.append((account, account.charges()))
        self._enqueue(_Recount(marked, done))
        return [account for account, _ in marked]

    async def reserve(self, key_id: str, terms: KeyBilling, nanos: int, count: int) -> Reservation:
        """Hold balance alone, no limits (the ledger's own tests and benchmark)."""
        return hold(await self.account(key_id, terms), terms, nanos, count)

    async def admit(self, key: ApiKey, nanos: int, balance_nanos: int, count: int, tokens: int, now: float, request_id: str) -> Reservation:
        """After the awaited loads, every limit and the balance are checked and held in one
        synchronous step: no other request runs on the loop in between."""
        terms, limits = key.billing, key.limits
        account = await self.account(key.id, terms)
        group = key.account if key.account is not None and key.account.limits.meters_anything else None  # the account's own limits
        if limits.period_limits:
            await self.limiter.prepare(key, now)
        if group is not None and group.limits.period_limits:
            await self.limiter.prepare(group, now)
        holds = self.limiter.acquire(key, account, nanos, tokens, now) if limits.meters_anything else None
        try:
            group_holds = self.limiter.acquire(group, account.holder, nanos, tokens, now) if group is not None else None
        except Exception:
            if holds is not None:
                self.limiter.release(holds, 0, 0, now, 0, counted=False)
            raise
        try:
            reservation = hold(account, terms, balance_nanos, count)
        except InsufficientBalance:
            for held in (holds, group_holds):
                if held is not None:
                    self.limiter.release(held, 0, 0, now, 0, counted=False)
            raise
        reservation.holds = holds
        reservation.account_holds = group_holds
        return reservation

    def _enqueue(self, item: _QueueItem) -> int:
        self._seq += 1
        self._queue.put_nowait(item)
        return self._seq

    def query_in_order(self, query: Callable[[aiosqlite.Connection], Awaitable[T]]) -> tuple[int, asyncio.Future[T]]:
        """Run `query` once every item queued before it is committed and none after it is:
        returns the queue position (what later settlements compare with) and the result."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return self._enqueue(_InOrder(query, done)), done

    def vendor_month(self, provider: str, since: float, until: float) -> tuple[int, asyncio.Future[int]]:
        async def read(db: aiosqlite.Connection) -> int:
            async with db.execute(_VENDOR_MONTH, (provider, since, until)) as cursor:
                row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return self.query_in_order(read)

    def settle(self, reservation: Reservation, record: UsageRecord) -> int:
        reservation.unhold()
        reservation.account.charge(record)
        seq = self._enqueue(record)
        if reservation.holds is not None:
            self.limiter.release(reservation.holds, record.cost_nanos, record.prompt_tokens + record.completion_tokens, record.ts, seq)
        else:  # usage reported from elsewhere: nothing was held, but budgets still count it
            self.limiter.count_spend(record.key_id, record.cost_nanos, record.ts, seq)
        if reservation.account_holds is not None:
            self.limiter.release(reservation.account_holds, record.cost_nanos, record.prompt_tokens + record.completion_tokens, record.ts, seq)
        elif record.account_id:
            self.limiter.count_spend(record.account_id, record.cost_nanos, record.ts, seq)
        return seq

    report_every: float | None = None  # one process: a request in flight dies with it

    def report(self, reservation: Reservation, record: UsageRecord) -> None:
        pass

    def release(self, reservation: Reservation, record: UsageRecord | None = None) -> int:
        reservation.unhold()
        seq = self._seq
        if record is not None:
            for counted in {id(a): a for a in (reservation.account, reservation.account.holder)}.values():
                if counted.in_window(record.ts):
                    counted.request_count += 1
            seq = self._enqueue(record)
        for held in (reservation.holds, reservation.account_holds):
            if held is not None:
                self.limiter.release(held, 0, 0, record.ts if record is not None else self.limiter.clock(), seq)
        return seq

    async def grant(self, grant: Grant, terms: KeyBilling) -> bool:
        """Durable before it returns; the balance grows when the grant commits. While the
        database refuses writes, a 503 says the grant is queued rather than hanging."""
        account = await self.account(grant.key_id, terms)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(_GrantItem(grant, account, done))
        await self._written(done, "The top-up is queued and applies once the ledger writes again; retrying with the same Idempotency-Key is safe.")
        return done.result()

    def remember_response(self, stored: StoredResponse) -> None:
        self._enqueue(stored)

    async def stored_response(self, response_id: str) -> StoredResponse | None:
        async with self.reader.execute(_SELECT_STORED, (response_id,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else StoredResponse(*row)

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """A persistent setting (such as the session signing secret), created on first use."""
        await self.db.execute("INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)", (name, make()))
        async with self.db.execute("SELECT value FROM settings WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    # --- keys made and changed through the API (core/keys/records.py) ----------------------

    async def key_records(self) -> KeyRecords:
        async with self.db.execute(SELECT_RECORDS) as cursor:
            rows = await cursor.fetchall()
        return {row[0]: record_from_row(row) for row in rows}

    async def change_key_record(self, key_id: str, change: RecordChange) -> KeyRecord:
        """Read, change and store one key's record, one change at a time (committed before it
        returns: the secret it answers with must still work after a crash)."""
        async with self._records_lock:
            async with self.db.execute(SELECT_RECORDS + " WHERE id = ?", (key_id,)) as cursor:
                row = await cursor.fetchone()
            record = change(None if row is None else record_from_row(row))
            try:
                if row is None:
                    await self.db.execute(INSERT_RECORD, record_row(record))
                else:
                    await self.db.execute(UPDATE_RECORD, update_params(record))
            except sqlite3.IntegrityError as exc:
                raise RecordConflict("secret" if "digest" in str(exc) else "id") from None
            except sqlite3.Error as exc:
                raise GatewayError(503, "api_error", "ledger_not_writing", f"The ledger cannot write ({exc}); nothing was changed.") from None
            return record

    async def account_records(self) -> AccountRecords:
        async with self.db.execute(SELECT_ACCOUNTS) as cursor:
            rows = await cursor.fetchall()
        return {row[0]: account_from_row(row) for row in rows}

    async def change_account_record(self, name: str, change: AccountChange) -> AccountRecord:
        """`change_key_record` for an account's record (by name)."""
        async with self._records_lock:
            async with self.db.execute(SELECT_ACCOUNTS + " WHERE name = ?", (name,)) as cursor:
                row = await cursor.fetchone()
            record = change(None if row is None else account_from_row(row))
            try:
                await self.db.execute(INSERT_ACCOUNT if row is None else UPDATE_ACCOUNT, account_row(record) if row is None else account_update_params(record))
            except sqlite3.Error as exc:
                raise GatewayError(503, "api_error", "ledger_not_writing", f"The ledger cannot write ({exc}); nothing was changed.") from None
            return record

    # --- writing ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (what exact reads need first).
        While the database refuses writes that would be forever: a 503 instead."""
        if self._writer is None or self._writer.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(done)
        await self._written(done, "Figures read now would leave out charges still waiting to be written.")

    async def _written(self, done: asyncio.Future[Any], consequence: str) -> None:
        while not done.done():
            if self.write_error is not None:
                raise GatewayError(503, "api_error", "ledger_not_writing", f"The ledger cannot write ({self.write_error}). {consequence}")
            await asyncio.wait([done], timeout=WRITE_CHECK_SECONDS)

    async def close(self) -> None:
        """Write everything queued, then close (a shutdown waits out a full disk for a while)."""
        if self._writer is not None and not self._writer.done():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._enqueue(done)
            try:
                await asyncio.wait_for(done, CLOSE_WAIT_SECONDS)
            except TimeoutError:
                log.error("shutting down with %d ledger rows unwritten: %s", self.health()["unwritten_rows"], self.write_error)
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        await self.reader.close()
        await self.db.close()

    async def _write_loop(self) -> None:
        """Group commit: charges are collected for GROUP_COMMIT_SECONDS and written in one
        transaction (a crash loses at most that window). Items are handled strictly in
        queue order; a flush or a read in order waits for the window like everything else."""
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < MAX_BATCH:
                await asyncio.sleep(GROUP_COMMIT_SECONDS)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            pending: list[_Written] = []
            for item in batch:
                if isinstance(item, (UsageRecord, _GrantItem, StoredResponse)):
                    pending.append(item)
                    continue
                await self._commit_with_retry(pending)
                pending = []
                if isinstance(item, _Recount):
                    await self._run_recount(item)
                elif isinstance(item, _InOrder):
                    await self._run_in_order(item)
                elif not item.done():
                    item.set_result(None)
            await self._commit_with_retry(pending)

    async def _commit_with_retry(self, items: list[_Written]) -> None:
        """On an operational failure (disk full, locked file) keep the rows and try again:
        the requests have their answers already, and their charges stay in memory meanwhile.
        A row the database refuses outright must not block the others: the batch is then
        written row by row and the refused row is logged in full."""
        if not items:
            return
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                applied = await self._commit(items)
                if self.write_error is not None:
                    log.warning("ledger writes work again; %d held rows written", len(items))
                self.write_error, self._retrying = None, 0
                self.on_commit(time.perf_counter() - started, self._queue.qsize())
                break
            except sqlite3.OperationalError as exc:
                if self.write_error != str(exc):
                    log.exception("ledger write of %d rows failed; retrying (every %.0fs at most) until it works", len(items), MAX_RETRY_DELAY)
                self.write_error, self._retrying = str(exc), len(items)
                self.on_commit(None, self._queue.qsize() + self._retrying)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
            except Exception:
                if len(items) == 1:
                    log.exception("the ledger refused a row; it is dropped: %r", items[0])
                    applied = [False] if isinstance(items[0], _GrantItem) else []
                    break
                for item in items:
                    await self._commit_with_retry([item])
                return
        for item, was_applied in zip((i for i in items if isinstance(i, _GrantItem)), applied, strict=True):
            grant, account = item.grant, item.account
            if was_applied and account.in_window(grant.ts):
                if grant.kind == CREDITS:
                    account.granted_nanos += grant.amount
                else:
                    account.count_granted += grant.amount
            if not item.done.done():
                item.done.set_result(was_applied)

    async def _commit(self, items: list[_Written]) -> list[bool]:
        # One hop to the database thread for the whole transaction: building the rows and
        # every statement run there, not on the event loop. (`_execute` and `_conn` are
        # aiosqlite's own way to run a function on its thread; the version is pinned.)
        return await self.db._execute(_commit_sync, self.db._conn, items, self._prune_before(items))  # type: ignore[no-any-return]

    def _prune_before(self, items: list[_Written]) -> float | None:
        """The age before which stored responses are dropped in this batch, at most hourly
        and only in a batch that stores one (so the table stays bounded, the hot path untouched)."""
        now = self.limiter.clock()
        if now < self._next_prune or not any(isinstance(item, StoredResponse) for item in items):
            return None
        self._next_prune = now + PRUNE_EVERY_SECONDS
        return now - RESPONSE_RETENTION_SECONDS

    async def _run_in_order(self, item: _InOrder) -> None:
        try:
            result = await item.query(self.db)
        except Exception as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if not item.done.done():
            item.done.set_result(result)

    async def _run_recount(self, item: _Recount) -> None:
        windows = [Window(account.key_id, account.window_start) for account, _ in item.accounts]
        owners = [window for window in windows if window.key_id.startswith(ACCOUNT_ID_PREFIX)]
        try:
            totals = await window_totals(self.db, [window for window in windows if not window.key_id.startswith(ACCOUNT_ID_PREFIX)])
            if owners:
                totals.update(await account_totals(self.db, owners))
            granted = await grant_totals(self.db, windows)
        except Exception as exc:
            log.exception("rebuilding %d balances from the ledger failed", len(windows))
            for account, _ in item.accounts:
                self._accounts.pop(account.key_id, None)
            if not item.done.done():
                item.done.set_exception(exc)
            return
        for account, when_queued in item.accounts:
            t = totals.get((account.key_id,), Totals())
            counted = (t.token_cost_nanos, t.count_charged, t.cost_nanos, t.requests, t.prompt_tokens + t.completion_tokens)
            # Settlements queued after the marker are already in memory but not in the sums.
            now = account.charges()
            account.set_charges(tuple(c + n - q for c, n, q in zip(counted, now, when_queued, strict=True)))  # type: ignore[arg-type]
            account.granted_nanos, account.count_granted = granted.get(account.key_id, (0, 0))
        if not item.done.done():
            item.done.set_result(None)

    def health(self) -> dict[str, Any]:
        """For /health: whether writes work, and how many charges wait in memory to be written."""
        return {"writing": self.write_error is None, "last_write_error": self.write_error, "unwritten_rows": self._queue.qsize() + self._retrying}

    async def append_audit(self, entry: AuditEntry) -> None:
        """Durable before it returns (its own transaction: admin actions are rare). The action
        has happened by now, so a failed write (disk full) must not turn it into an error: the
        entry goes to the log in full instead (it holds names and ids, never a key)."""
        try:
            await self.db.execute(INSERT_AUDIT, entry.row())
        except sqlite3.Error:
            log.exception("audit entry not written to the ledger, recorded here instead: %r", entry.row())

    # --- reading ------------------------------------------------------------------------

    async def audit_entries(self, limit: int, before_id: int | None = None, key_id: str | None = None) -> list[dict[str, Any]]:
        """Newest first, `limit` rows older than `before_id` (keyset paging), for one key or all."""
        return await read_audit_page(self.reader, limit, before_id, key_id)

    async def grants_in(self, windows: list[Window]) -> dict[str, tuple[int, int]]:
        """(credits in nanos, count credits) granted per key within each window."""
        await self.flush()
        return await grant_totals(self.reader, windows)

    async def totals(self, windows: list[Window], by_model: bool = False) -> dict[tuple[str, ...], Totals]:
        """Usage totals per key (or key, model and cost type) over each key's window; exact
        as of now, because everything queued is committed first."""
        await self.flush()
        return await window_totals(self.reader, windows, by_model)


def _owner_id(account: Account) -> str | None:
    return account.owner.key_id if account.owner is not None else None


def _insert_usage(db: sqlite3.Connection, records: list[UsageRecord]) -> None:
    """Insert in chunks of _USAGE_CHUNKS rows (UsageRecord is a tuple in column order)."""
    start = 0
    for size in _USAGE_CHUNKS:
        statement = _INSERT_USAGE[size]
        while len(records) - start >= size:
            db.execute(statement, list(itertools.chain.from_iterable(records[start : start + size])))
            start += size


def _commit_sync(db: sqlite3.Connection, items: list[_Written], prune_before: float | None = None) -> list[bool]:
    """Write one batch in one transaction (runs on the database thread); whether each grant
    applied (an idempotency key seen before does not)."""
    records = [item for item in items if isinstance(item, UsageRecord)]
    stored = [item for item in items if isinstance(item, StoredResponse)]
    applied = []
    db.execute("BEGIN IMMEDIATE")
    try:
        if stored:
            db.executemany(_INSERT_STORED, stored)
        if prune_before is not None:
            db.execute("DELETE FROM stored_responses WHERE created_at < ?", (prune_before,))
        if records:
            (last_id,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM usage").fetchone()
            _insert_usage(db, records)
            for sql in ROLLUP_STATEMENTS:
                db.execute(sql, (last_id,))
        for item in items:
            if isinstance(item, _GrantItem):
                g = item.grant
                cursor = db.execute(_INSERT_GRANT, (g.key_id, g.kind, g.amount, g.reason, g.idempotency_key, g.ts))
                applied.append(cursor.rowcount == 1)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite has already rolled back after some errors (disk full)
            db.execute("ROLLBACK")
        raise
    return applied


def _ignore_commit(seconds: float | None, unwritten: int) -> None:
    """`on_commit` until the app sets its metrics' hook."""
