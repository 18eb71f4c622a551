"""The fleet ledger: PostgreSQL shared by every gateway process and host.

Every guarantee the single process keeps in memory is kept here in the database, so that
it holds however many instances serve one key:

- Admission is one transaction under the key's `accounts` row lock: it reads the key's
  counters, what requests in flight hold (`reservations`), its rate windows and budget
  periods, checks them with the same rules as the embedded ledger (core/limits.py), and
  inserts the request's reservation. Instances cannot interleave between check and hold. The
  requests of one key waiting in an instance share one such transaction (PgLedger.admit), so
  a key's row lock is taken per batch of requests, not per request.
  It commits with `synchronous_commit = off`: a reservation lost in a database crash only
  ever frees a hold.
- Settlements are queued and group-committed by one writer per instance (durably), in one
  transaction per batch: the usage rows, the key counters, the rollups, and the deletion of
  the reservations they end — the hold turns into the charge atomically. A usage row's
  request id is unique, so a batch retried after a lost reply applies once.
- Each instance heartbeats in `instances`; one that stops (kill -9, lost host) is removed
  after LEASE_SECONDS by any other, and its reservations with it: what its requests held is
  free again without an operator.
- When the database cannot be reached, admission answers 503 `ledger_unavailable` (never
  admits on a guess) and settlements wait in memory and are written once it is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import orjson

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
from core.ledger.pg_errors import DATABASE_ERRORS, UNREACHABLE, reachable, reason, unavailable
from core.ledger.pg_reader import PgReader, numbered
from core.ledger.postgres_schema import migrate
from core.ledger.rollups import ROLLUPS
from core.ledger.sums import Totals, Window, account_totals, grant_totals, window_totals
from core.limits import KeyState, Limiter, PeriodSpend, RateWindow, period_bounds
from core.metering import ERROR

log = logging.getLogger("tollgate.ledger")
T = TypeVar("T")

HEARTBEAT_SECONDS = float(os.environ.get("TOLLGATE_HEARTBEAT_SECONDS", "2"))
LEASE_SECONDS = float(os.environ.get("TOLLGATE_LEASE_SECONDS", "10"))
# Connections per process for admissions and reads (plus one for the settlement writer): an
# admission holds one for a few round trips, so a handful serves thousands of requests/s.
POOL_SIZE = int(os.environ.get("TOLLGATE_DATABASE_POOL", "10"))
GROUP_COMMIT_SECONDS = 0.01
MAX_BATCH = 2000
MAX_ADMISSIONS = 500  # requests of one key admitted in one transaction, at most
MAX_RETRY_DELAY = 5.0
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
WRITE_CHECK_SECONDS = 0.25
STREAM_REPORT_SECONDS = float(os.environ.get("TOLLGATE_STREAM_REPORT_SECONDS", "2"))
SETTINGS_POLL_SECONDS = 0.5  # how soon a setting changed through another instance is in force here
SETTINGS_VERSION = "api_keys_version"
CLOSE_WAIT_SECONDS = 30.0

_ACCOUNT_COLUMNS = "window_start, spent_nanos, count_used, total_cost_nanos, request_count, tokens_used, granted_nanos, count_granted"
_USAGE_COLUMNS = UsageRecord._fields
_USAGE_TYPES = {
    "request_id": "text",
    "ts": "float8",
    "key_id": "text",
    "key_name": "text",
    "model": "text",
    "provider": "text",
    "upstream_model": "text",
    "cost_type": "text",
    "unit_prices": "text",
    "status": "text",
    "account_id": "text",
    "vendor_unit_prices": "text",
}
# pg_advisory_xact_lock key of `provider_spend`: settlements take it shared, the instance that
# creates a month's row takes it alone, so no charge falls between the row's sum and its updates.
VENDOR_SPEND_LOCK = 0x70_11_6A_7F


def _settle_sql() -> str:
    """One statement for a batch: insert its usage rows (once: the request id is unique),
    end its reservations, move each key's counters, rate windows and budget periods, and add
    the rows to the rollups. Every part reads the rows actually inserted (`new`)."""
    n = len(_USAGE_COLUMNS)
    arrays = ", ".join(f"${i + 1}::{_USAGE_TYPES.get(name, 'int8')}[]" for i, name in enumerate(_USAGE_COLUMNS))
    columns = ", ".join(_USAGE_COLUMNS)
    rollups = ",\n".join(f"{rollup.table}_added AS ({rollup.pg_upsert('new')})" for rollup in ROLLUPS)
    return f"""
    WITH batch AS (SELECT * FROM unnest({arrays}) AS b({columns})),
    new AS (
        INSERT INTO usage ({columns}) SELECT {columns} FROM batch ORDER BY ts
        ON CONFLICT (request_id) DO NOTHING RETURNING {columns}
    ),
    freed AS (DELETE FROM reservations WHERE request_id = ANY(${n + 1}::text[]) RETURNING request_id, key_id, owner_id, tokens, admitted_at),
    accounts_moved AS (
        UPDATE accounts a SET spent_nanos = a.spent_nanos + d.spent, count_used = a.count_used + d.count_used,
            total_cost_nanos = a.total_cost_nanos + d.total, request_count = a.request_count + d.requests, tokens_used = a.tokens_used + d.tokens
        FROM (SELECT n.key_id, SUM(CASE WHEN n.cost_type = 'token' THEN n.cost_nanos ELSE 0 END) AS spent, SUM(n.count_charged) AS count_used,
                     SUM(n.cost_nanos) AS total, COUNT(*) AS requests, SUM(n.prompt_tokens + n.completion_tokens) AS tokens
              FROM new n JOIN accounts w ON w.key_id = n.key_id WHERE n.ts >= w.window_start GROUP BY n.key_id) d
        WHERE a.key_id = d.key_id
    ),
    owners_moved AS (
        UPDATE accounts a SET spent_nanos = a.spent_nanos + d.spent, count_used = a.count_used + d.count_used,
            total_cost_nanos = a.total_cost_nanos + d.total, request_count = a.request_count + d.requests, tokens_used = a.tokens_used + d.tokens
        FROM (SELECT n.account_id, SUM(CASE WHEN n.cost_type = 'token' THEN n.cost_nanos ELSE 0 END) AS spent, SUM(n.count_charged) AS count_used,
                     SUM(n.cost_nanos) AS total, COUNT(*) AS requests, SUM(n.prompt_tokens + n.completion_tokens) AS tokens
              FROM new n JOIN accounts w ON w.key_id = n.account_id WHERE n.account_id <> '' AND n.ts >= w.window_start GROUP BY n.account_id) d
        WHERE a.key_id = d.account_id
    ),
    periods_moved AS (
        UPDATE period_spend p SET nanos = p.nanos + d.cost
        FROM (SELECT q.key_id, q.name, SUM(n.cost_nanos) AS cost FROM new n
              JOIN period_spend q ON q.key_id = n.key_id AND n.ts >= q.since AND n.ts < q.period_end GROUP BY q.key_id, q.name) d
        WHERE p.key_id = d.key_id AND p.name = d.name
    ),
    account_periods_moved AS (
        UPDATE period_spend p SET nanos = p.nanos + d.cost
        FROM (SELECT q.key_id, q.name, SUM(n.cost_nanos) AS cost FROM new n
              JOIN period_spend q ON q.key_id = n.account_id AND n.ts >= q.since AND n.ts < q.period_end WHERE n.account_id <> '' GROUP BY q.key_id, q.name) d
        WHERE p.key_id = d.key_id AND p.name = d.name
    ),
    token_windows_moved AS (
        UPDATE rate_windows w SET used = w.used + d.delta
        FROM (SELECT f.key_id, r.seconds, SUM(COALESCE(n.prompt_tokens + n.completion_tokens, 0) - f.tokens) AS delta
              FROM freed f JOIN rate_windows r ON r.key_id = f.key_id AND r.kind = 'tokens' AND r.window_start = floor(f.admitted_at / r.seconds) * r.seconds
              LEFT JOIN new n ON n.request_id = f.request_id GROUP BY f.key_id, r.seconds) d
        WHERE w.key_id = d.key_id AND w.kind = 'tokens' AND w.seconds = d.seconds
    ),
    account_token_windows_moved AS (
        UPDATE rate_windows w SET used = w.used + d.delta
        FROM (SELECT f.owner_id, r.seconds, SUM(COALESCE(n.prompt_tokens + n.completion_tokens, 0) - f.tokens) AS delta
              FROM freed f JOIN rate_windows r ON r.key_id = f.owner_id AND r.kind = 'tokens' AND r.window_start = floor(f.admitted_at / r.seconds) * r.seconds
              LEFT JOIN new n ON n.request_id = f.request_id WHERE f.owner_id <> '' GROUP BY f.owner_id, r.seconds) d
        WHERE w.key_id = d.owner_id AND w.kind = 'tokens' AND w.seconds = d.seconds
    ),
    provider_spend_moved AS (
        UPDATE provider_spend p SET nanos = p.nanos + d.cost
        FROM (SELECT q.provider, q.since, q.period_end, SUM(n.vendor_cost_nanos) AS cost FROM new n
              JOIN provider_spend q ON q.provider = n.provider AND n.ts >= q.since AND n.ts < q.period_end
              WHERE n.vendor_cost_nanos IS NOT NULL GROUP BY q.provider, q.since, q.period_end) d
        WHERE p.provider = d.provider AND p.since = d.since AND p.period_end = d.period_end
    ),
    {rollups}
    SELECT (SELECT COUNT(*) FROM new), (SELECT COUNT(*) FROM freed)
    """


_SETTLE_SQL = _settle_sql()

# Admission's writes in one statement: a batch's reservations (one key's: $1 and $4-$7 are
# columns), and what they count in the rate windows, the key's and its account's (a window that
# has moved on starts again from this batch).
_HOLD_SQL = """
WITH held AS (
    INSERT INTO reservations (request_id, key_id, instance_id, nanos, balance_nanos, count, tokens, admitted_at, owner_id)
    SELECT r.request_id, $2, $3, r.nanos, r.balance_nanos, r.count, r.tokens, $8, $13
    FROM unnest($1::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[]) AS r(request_id, nanos, balance_nanos, count, tokens)
),
account_windows AS (
    INSERT INTO rate_windows (key_id, kind, seconds, window_start, used)
    SELECT $13, w.kind, w.seconds, w.start, w.used FROM unnest($14::text[], $15::int8[], $16::float8[], $17::int8[]) AS w(kind, seconds, start, used)
    ON CONFLICT (key_id, kind, seconds) DO UPDATE SET window_start = excluded.window_start,
        used = CASE WHEN rate_windows.window_start = excluded.window_start THEN rate_windows.used + excluded.used ELSE excluded.used END
)
INSERT INTO rate_windows (key_id, kind, seconds, window_start, used)
SELECT $2, w.kind, w.seconds, w.start, w.used FROM unnest($9::text[], $10::int8[], $11::float8[], $12::int8[]) AS w(kind, seconds, start, used)
ON CONFLICT (key_id, kind, seconds) DO UPDATE SET window_start = excluded.window_start,
    used = CASE WHEN rate_windows.window_start = excluded.window_start THEN rate_windows.used + excluded.used ELSE excluded.used END
"""


def _refuse_all(admissions: Iterable[_Admission], error: BaseException | Callable[[], BaseException]) -> None:
    """Answer every admission still waiting with an error (each its own when `error` makes them)."""
    for admission in admissions:
        if not admission.decided.done():
            admission.decided.set_exception(error if isinstance(error, BaseException) else error())


def _again(error: GatewayError) -> GatewayError:
    """The same error for another request (each raises its own: a traceback is per raise)."""
    return GatewayError(error.status, error.type, error.code, error.message, dict(error.headers), param=error.param)


def _window_columns(counts: dict[tuple[str, int, float], int]) -> tuple[list[str], list[int], list[float], list[int]]:
    """What a batch counts in rate windows, as _HOLD_SQL's columns (kinds, seconds, starts, counts)."""
    return [kind for kind, _, _ in counts], [seconds for _, seconds, _ in counts], [start for _, _, start in counts], list(counts.values())


@dataclass(slots=True, eq=False)
class _Admission:
    """A request waiting in this process for its key's next admission transaction."""

    key: ApiKey
    nanos: int
    balance_nanos: int
    count: int
    tokens: int
    now: float
    request_id: str
    decided: asyncio.Future[Reservation]  # the reservation, or why it was refused


@dataclass(slots=True)
class _Ended:
    """A settlement or release to write: the request's record (if any) and its reservation."""

    record: UsageRecord | None
    reservation_id: str | None


@dataclass(slots=True)
class _Progress:
    """A stream's usage so far, kept with its reservation."""

    reservation_id: str
    record: UsageRecord


_Written = _Ended | _Progress | StoredResponse  # what a batch's transaction writes
_QueueItem = _Written | asyncio.Future  # a bare future is a flush marker
_INSERT_STORED = (
    "INSERT INTO stored_responses (response_id, key_id, provider, created_at)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) ON CONFLICT (response_id) DO NOTHING"
)
PRUNE_EVERY_SECONDS = 3600.0  # how often a writer drops stored responses past their retention


class FleetLimiter(Limiter):
    """The limiter's state as pages and alerts read it, in fleet mode: other instances change
    it too, so `prepare` (what a page calls before showing a key's limits) reads it afresh."""

    ledger: PgLedger

    async def prepare(self, key: ApiKey, now: float) -> None:
        await self.ledger.refresh_view(key, now)


class PgLedger:
    """The Ledger interface on PostgreSQL (see the module's docstring for how)."""

    shared = True
    report_every: float | None = STREAM_REPORT_SECONDS

    def __init__(self, url: str, pool: asyncpg.Pool, writer: asyncpg.Connection, clock: Callable[[], float]):
        self.url = url
        self.pool = pool
        self.writer = writer
        self.clock = clock
        self.reader = PgReader(pool)
        self.limiter = FleetLimiter(self, clock)  # its state is this instance's view, for pages and headers
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._accounts: dict[str, Account] = {}
        self._waiting: dict[str, list[_Admission]] = {}  # key id -> its requests waiting for admission
        self._admitters: set[asyncio.Task[None]] = set()  # one per key with requests waiting
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._keeper: asyncpg.Connection | None = None  # the heartbeat's own connection
        self.write_error: str | None = None
        self._retrying = 0
        # Told of each group commit: (seconds, or None when it failed; rows still unwritten).
        self.on_commit: Callable[[float | None, int], None] = _ignore_commit
        self.database_error: str | None = None  # the heartbeat's last failure, for /health
        # What this instance serves, for the fleet's status: set by the app (config hash, error).
        self.config_source: Callable[[], tuple[str, str | None]] = lambda: ("", None)
        self.live_instances = 1  # as the last heartbeat counted them (the auth throttle shares its limit)
        self._settings_version: str | None = None
        self._settings_task: asyncio.Task[None] | None = None
        self._in_order = asyncio.Lock()
        self._next_prune = 0.0  # when the writer next drops expired stored responses

    @classmethod
    async def open(cls, url: str, clock: Callable[[], float] = time.time, pool_size: int = POOL_SIZE) -> PgLedger:
        """Connect, migrate (one instance at a time), register this instance and start its
        writer and heartbeat. Raises LedgerUnavailable with the reason when it cannot."""
        from core.ledger.sqlite import LedgerUnavailable

        try:
            conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
            try:
                await migrate(conn)
            finally:
                await conn.close()
            # Admission's holds may be lost in a crash (they only free): no wait for the WAL flush.
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                reset=_no_reset,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"synchronous_commit": "off", "application_name": "tollgate"},
            )
            writer = await asyncpg.connect(
                url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT, server_settings={"application_name": "tollgate-writer"}
            )
        except (*DATABASE_ERRORS, ValueError) as exc:
            raise LedgerUnavailable(f"cannot use the PostgreSQL ledger at {redact(url)}: {exc}") from exc
        ledger = cls(url, pool, writer, clock)
        await ledger._register()
        ledger._writer_task = asyncio.create_task(ledger._write_loop())
        ledger._heartbeat_task = asyncio.create_task(ledger._heartbeat_loop())
        return ledger

    # --- admission ----------------------------------------------------------------------

    async def admit(self, key: ApiKey, nanos: int, balance_nanos: int, count: int, tokens: int, now: float, request_id: str) -> Reservation:
        """Check and hold the balance and every limit of the key under the key's row lock.
        Raises InsufficientBalance, a limit's GatewayError, or 503. The request joins its key's
        queue in this process; the key's next transaction admits everything queued then."""
        decided: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(key.id)
        if waiting is None:
            waiting = self._waiting[key.id] = []
            task = asyncio.create_task(self._admit_in_turns(key.id, waiting))
            self._admitters.add(task)
            task.add_done_callback(self._admitters.discard)
        waiting.append(_Admission(key, nanos, balance_nanos, count, tokens, now, request_id, decided))
        try:
            return await decided  # a request that leaves cancels it: its turn then holds nothing
        except asyncio.CancelledError:  # ...unless it left after its hold was handed over, before it woke
            if decided.done() and not decided.cancelled() and decided.exception() is None:
                self.release(decided.result())
            raise

    async def _admit_in_turns(self, key_id: str, waiting: list[_Admission]) -> None:
        """One admission transaction per key at a time in this process, each taking every
        request of the key queued meanwhile (up to MAX_ADMISSIONS). One at a time: queued
        requests wait here holding no database connection, instead of on the key's row lock
        in PostgreSQL (each holding a pooled connection, lengthening the queue for every
        instance). Together: the lock is held for a few round trips per batch, not per request,
        so a key's admissions keep up with any rate of requests, however many instances."""
        batch: list[_Admission] = []
        latest = float("-inf")  # the batches' time never goes back (a reload can split them out of order)
        try:
            while waiting:
                key = waiting[0].key  # a reload may have changed the key: one version per batch
                batch, rest = [], list[_Admission]()
                for admission in waiting:
                    (batch if admission.key is key and len(batch) < MAX_ADMISSIONS else rest).append(admission)
                waiting[:] = rest
                latest = max([latest, *(admission.now for admission in batch)])
                await self._admit_batch(key, [admission for admission in batch if not admission.decided.done()], latest)
        except Exception as exc:  # a bug: nobody may wait forever
            log.exception("admission for key id %s failed", key_id)
            _refuse_all((*batch, *waiting), exc)
        except asyncio.CancelledError:  # the gateway stopping
            _refuse_all((*batch, *waiting), lambda: unavailable("the gateway is stopping"))
            raise
        finally:
            del self._waiting[key_id]

    async def _admit_batch(self, key: ApiKey, batch: list[_Admission], now: float) -> None:
        """Admit or refuse each of `batch` (one key's requests, in arrival order) in one
        transaction: one read of the key's state, each request checked and held against it in
        turn as the embedded ledger does in memory, one statement writing every hold. `now`:
        the batch's time (its latest request's), the same for every hold of the batch."""
        if not batch:
            return
        admitted: list[tuple[_Admission, Reservation]] = []
        refused: list[tuple[_Admission, Exception]] = []
        hold_sent = False
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                account, state, group_state = await self._locked_state(conn, key, now)
                # Never count in a rate window older than one the database has (another host's
                # clock ahead of ours): the older one would start again from zero.
                now = max([now, *(window.start for held in (state, group_state) if held is not None for window in held.windows.values())])
                group = key.account if group_state is not None and key.account is not None and key.account.limits.meters_anything else None
                windows: dict[tuple[str, int, float], int] = {}
                group_windows: dict[tuple[str, int, float], int] = {}
                for admission in batch:
                    if admission.decided.done():  # its request left while the state was read
                        continue
                    try:
                        reservation = self._hold_one(key, group, account, state, group_state, admission, now, windows, group_windows)
                    except (GatewayError, InsufficientBalance) as exc:
                        refused.append((admission, exc))
                        continue
                    admitted.append((admission, reservation))
                if admitted:
                    hold_sent = True
                    await conn.execute(
                        _HOLD_SQL,
                        [admission.request_id for admission, _ in admitted],
                        key.id,
                        self.instance_id,
                        [admission.nanos for admission, _ in admitted],
                        [admission.balance_nanos for admission, _ in admitted],
                        [admission.count for admission, _ in admitted],
                        [admission.tokens for admission, _ in admitted],
                        now,
                        *_window_columns(windows),
                        key.billing.owner or "",
                        *_window_columns(group_windows),
                    )
        except (*DATABASE_ERRORS, GatewayError) as exc:  # (a read's lost connection is a GatewayError 503: pg_errors.reachable)
            if isinstance(exc, asyncpg.PostgresError):
                log.error("admission for key %s failed in the database: %s", key.masked, exc)
            self._free_sent(admitted if hold_sent else [])
            _refuse_all(batch, functools.partial(_again, exc) if isinstance(exc, GatewayError) else functools.partial(unavailable, reason(exc)))
            return
        except BaseException:  # cancelled (the gateway stopping) or a bug: the caller's runner answers the waiting
            self._free_sent(admitted if hold_sent else [])
            raise
        if key.limits.meters_anything:  # this instance's view of the key, for headers and pages
            self.limiter._state[key.id] = state
        if group is not None and group_state is not None:
            self.limiter._state[group.id] = group_state
        for admission, refusal in refused:
            if not admission.decided.done():
                admission.decided.set_exception(refusal)
        for admission, reservation in admitted:
            reservation.request_id, reservation.tokens, reservation.admitted_at = admission.request_id, admission.tokens, now
            if admission.decided.done():  # its request left while the holds were written: free its own
                self.release(reservation)
            else:
                admission.decided.set_result(reservation)

    def _free_sent(self, admitted: list[tuple[_Admission, Reservation]]) -> None:
        """Holds whose commit may have reached the database with its reply lost: free them if so
        (the release of a reservation that is not there is a no-op)."""
        for admission, _ in admitted:
            self._queue.put_nowait(_Ended(None, admission.request_id))

    def _hold_one(
        self,
        key: ApiKey,
        group: ApiKey | None,
        account: Account,
        state: KeyState,
        group_state: KeyState | None,
        admission: _Admission,
        now: float,
        windows: dict[tuple[str, int, float], int],
        group_windows: dict[tuple[str, int, float], int],
    ) -> Reservation:
        """Check and hold one request against the batch's state (what the requests before it
        hold included), adding what it counts in each rate window; a refused request holds
        nothing (what its first checks held is given back)."""
        nanos, tokens = admission.nanos, admission.tokens
        holds = self.limiter.acquire(key, account, nanos, tokens, now, state) if key.limits.meters_anything else None
        try:
            group_holds = self.limiter.acquire(group, account.holder, nanos, tokens, now, group_state) if group is not None else None
        except GatewayError:
            if holds is not None:
                self.limiter.release(holds, 0, 0, now, 0, counted=False, state=state)
            raise
        try:
            reservation = hold(account, key.billing, admission.balance_nanos, admission.count)
        except InsufficientBalance:
            if holds is not None:
                self.limiter.release(holds, 0, 0, now, 0, counted=False, state=state)
            if group_holds is not None:
                self.limiter.release(group_holds, 0, 0, now, 0, counted=False, state=group_state)
            raise
        for held, counts in ((holds, windows), (group_holds, group_windows)):
            for kind, seconds, start in held.rate_windows if held is not None else ():
                counts[(kind, seconds, start)] = counts.get((kind, seconds, start), 0) + (1 if kind == "requests" else tokens)
        return reservation

    async def refresh_view(self, key: ApiKey, now: float) -> None:
        """This instance's view of a key's account and limits, read now (for a page)."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                _, state, _ = await self._locked_state(conn, key, now)
        except UNREACHABLE as exc:
            raise unavailable(reason(exc)) from None
        self.limiter._state[key.id] = state

    async def _locked_state(self, conn: asyncpg.Connection, key: ApiKey, now: float) -> tuple[Account, KeyState, KeyState | None]:
        """The key's account and limit state, read under its row lock, in one round trip
        (`tollgate_key_state`, core/ledger/postgres_schema.py); for a key in an account, first
        the account's (its balance and its own limits, under its row lock, taken first)."""
        owner, group_state = None, None
        if key.billing.owner is not None and key.account is not None:
            row = await conn.fetchrow("SELECT * FROM tollgate_owner_state($1)", key.billing.owner)
            owner, group_state = await self._state_of(conn, key.account, row, now)
        row = await conn.fetchrow("SELECT * FROM tollgate_key_state($1)", key.id)
        account, state = await self._state_of(conn, key, row, now)
        account.owner = owner
        return account, state, group_state

    async def _state_of(self, conn: asyncpg.Connection, key: ApiKey, row: asyncpg.Record, now: float) -> tuple[Account, KeyState]:
        """A key's (or an account's stand-in key's) Account and KeyState from its state row."""
        terms, limits = key.billing, key.limits
        account = self._cached(key.id, terms.created_at)
        _fill(account, row if row["window_start"] == terms.created_at else await self._recount(conn, key.id, terms.created_at))
        account.reserved_nanos, account.reserved_count = row["held_balance_nanos"], row["held_count"]
        state = KeyState(in_flight=row["held_requests"], quota_reserved=row["held_tokens"] if limits.quota_type == "tokens" else row["held_nanos"])
        if row["rate_kinds"]:
            for kind, seconds, start, used in zip(row["rate_kinds"], row["rate_seconds"], row["rate_starts"], row["rate_used"], strict=True):
                state.windows[(kind, seconds)] = RateWindow(start, used)
        if limits.period_limits:
            periods = zip(row["period_names"] or (), row["period_since"] or (), row["period_ends"] or (), row["period_nanos"] or (), strict=True)
            await self._period_state(conn, key, now, state, row["held_nanos"], {name: (since, end, nanos) for name, since, end, nanos in periods})
        return account, state

    async def _period_state(
        self, conn: asyncpg.Connection, key: ApiKey, now: float, state: KeyState, reserved: int, rows: dict[str, tuple[float, float, int]]
    ) -> None:
        """Each budget period's spend; a new period (or one whose start moved) is summed from
        the ledger once, under the key's lock, and kept up by settlements from then on."""
        loop = asyncio.get_running_loop()
        for limit in key.limits.period_limits:
            start, end = period_bounds(limit.period, key.limits.timezone, now)
            since = max(start, key.billing.created_at)
            found = rows.get(limit.name)
            if found is not None and found[0] == since and found[1] == end:
                spent = int(found[2])
            else:
                totals_of = account_totals if key.id.startswith(ACCOUNT_ID_PREFIX) else window_totals  # an account's: its keys'
                totals = await totals_of(PgReader(conn), [Window(key.id, since, end)])  # type: ignore[arg-type]
                spent = totals[(key.id,)].cost_nanos if (key.id,) in totals else 0
                await conn.execute(
                    "INSERT INTO period_spend (key_id, name, since, period_end, nanos) VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (key_id, name) DO UPDATE SET since = excluded.since, period_end = excluded.period_end, nanos = excluded.nanos",
                    key.id,
                    limit.name,
                    since,
                    end,
                    spent,
                )
            ready: asyncio.Future[None] = loop.create_future()
            ready.set_result(None)
            state.periods[limit.name] = PeriodSpend(start, end, db_nanos=spent, reserved_nanos=reserved, ready=ready)

    async def _recount(self, conn: asyncpg.Connection, key_id: str, window_start: float) -> asyncpg.Record:
        """Rebuild a key's counters from its usage and grants within its billing window (the
        first use of a key, or a changed `created_at`), under its row lock."""
        db = PgReader(conn)
        windows = [Window(key_id, window_start)]
        totals_of = account_totals if key_id.startswith(ACCOUNT_ID_PREFIX) else window_totals  # an account's: its keys' charges
        totals = (await totals_of(db, windows)).get((key_id,), Totals())  # type: ignore[arg-type]
        granted = (await grant_totals(db, windows)).get(key_id, (0, 0))  # type: ignore[arg-type]
        return await conn.fetchrow(
            "UPDATE accounts SET window_start = $2, spent_nanos = $3, count_used = $4, total_cost_nanos = $5, request_count = $6, tokens_used = $7,"
            f" granted_nanos = $8, count_granted = $9 WHERE key_id = $1 RETURNING {_ACCOUNT_COLUMNS}",
            key_id,
            window_start,
            totals.token_cost_nanos,
            totals.count_charged,
            totals.cost_nanos,
            totals.requests,
            totals.prompt_tokens + totals.completion_tokens,
            granted[0],
            granted[1],
        )

    def _cached(self, key_id: str, window_start: float) -> Account:
        """This instance's last view of a key's account: one object per key, updated in place,
        so a caller holding it (headers, audit before/after) sees what happened since."""
        account = self._accounts.get(key_id)
        if account is None:
            account = self._accounts[key_id] = Account(key_id, window_start)
        account.window_start = window_start
        return account

    # --- ending requests ------------------------------------------------------------------

    def settle(self, reservation: Reservation, record: UsageRecord) -> int:
        """Queue the charge; the reservation ends in the same transaction that writes it."""
        self._unhold_view(reservation)
        reservation.account.charge(record)  # this instance's view, for the response's headers
        self._queue.put_nowait(_Ended(record, reservation.request_id or None))
        return 0

    def report(self, reservation: Reservation, record: UsageRecord) -> None:
        if reservation.open and reservation.request_id:
            self._queue.put_nowait(_Progress(reservation.request_id, record))

    def release(self, reservation: Reservation, record: UsageRecord | None = None) -> int:
        was_open = reservation.open
        self._unhold_view(reservation)
        if record is not None or was_open:
            if record is not None and reservation.account.in_window(record.ts):
                reservation.account.request_count += 1
            self._queue.put_nowait(_Ended(record, reservation.request_id if was_open and reservation.request_id else None))
        return 0

    def _unhold_view(self, reservation: Reservation) -> None:
        if reservation.unhold():
            state = self.limiter._state.get(reservation.account.key_id)
            if state is not None and reservation.request_id:
                state.in_flight = max(0, state.in_flight - 1)

    async def _write_loop(self) -> None:
        """Group commit: what ended in the last GROUP_COMMIT_SECONDS goes in one transaction."""
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < MAX_BATCH:
                await asyncio.sleep(GROUP_COMMIT_SECONDS)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ended = [item for item in batch if isinstance(item, (_Ended, _Progress, StoredResponse))]
            await self._commit_with_retry(ended)
            for item in batch:
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)

    async def _commit_with_retry(self, items: list[_Written]) -> None:
        """While the database is away the rows wait here (the requests have their answers) and
        the batch is tried again; applying it twice is harmless (unique request ids). A row
        the database refuses outright must not hold back the others: it is logged in full."""
        if not items:
            return
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                await self._commit(items)
                if self.write_error is not None:
                    log.warning("ledger writes work again; %d held rows written", len(items))
                self.write_error, self._retrying = None, 0
                self.on_commit(time.perf_counter() - started, self._queue.qsize())
                return
            except (*UNREACHABLE, asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                if self.write_error != reason(exc):
                    log.warning("ledger write of %d rows failed (%s); retrying until it works", len(items), reason(exc))
                self.write_error, self._retrying = reason(exc), len(items)
                self.on_commit(None, self._queue.qsize() + self._retrying)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                await self._reconnect_writer()
            except asyncpg.PostgresError:
                if len(items) == 1:
                    log.exception("the ledger refused a row; it is dropped: %r", items[0])
                    return
                for item in items:
                    await self._commit_with_retry([item])
                return

    async def _commit(self, items: list[_Written]) -> None:
        ended = [item for item in items if isinstance(item, _Ended)]
        progress = {item.reservation_id: orjson.dumps(list(item.record)).decode() for item in items if isinstance(item, _Progress)}
        stored = [item for item in items if isinstance(item, StoredResponse)]
        async with self.writer.transaction():
            if stored:
                await self.writer.execute(_INSERT_STORED, *(list(column) for column in zip(*stored, strict=True)))
                now = self.clock()
                if now >= self._next_prune:  # at most hourly, in a batch that stores: the table stays bounded
                    await self.writer.execute("DELETE FROM stored_responses WHERE created_at < $1", now - RESPONSE_RETENTION_SECONDS)
                    self._next_prune = now + PRUNE_EVERY_SECONDS
            await settle_in(
                self.writer, [item.record for item in ended if item.record is not None], [item.reservation_id for item in ended if item.reservation_id]
            )
            if progress:  # (a reservation ended in this batch is gone: its update matches nothing)
                await self.writer.executemany("UPDATE reservations SET reported = $2 WHERE request_id = $1", list(progress.items()))

    async def _reconnect_writer(self) -> None:
        if not self.writer.is_closed():
            try:
                await self.writer.execute("SELECT 1")
                return
            except DATABASE_ERRORS:
                pass
        try:
            self.writer.terminate()
            self.writer = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)
        except DATABASE_ERRORS as exc:
            self.write_error = reason(exc)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed; 503 while the database is away."""
        if self._writer_task is None or self._writer_task.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        while not done.done():
            if self.write_error is not None:
                raise GatewayError(
                    503,
                    "api_error",
                    "ledger_not_writing",
                    f"The ledger cannot write ({self.write_error}). Figures read now would leave out charges still waiting to be written.",
                )
            await asyncio.wait([done], timeout=WRITE_CHECK_SECONDS)

    # --- balances and grants --------------------------------------------------------------

    async def account(self, key_id: str, terms: KeyBilling) -> Account:
        return (await self.accounts([(key_id, terms)]))[key_id]

    async def accounts(self, keys: list[tuple[str, KeyBilling]]) -> dict[str, Account]:
        """The keys' accounts as the database has them now, with what is held in flight (read,
        not locked: for pages, headers and reports)."""
        if not keys:
            return {}
        owners = {terms.owner: terms for _, terms in keys if terms.owner is not None}
        wanted = [*keys, *owners.items()]
        ids = [key_id for key_id, _ in wanted]
        try:
            rows = {row["key_id"]: row for row in await self.pool.fetch(f"SELECT key_id, {_ACCOUNT_COLUMNS} FROM accounts WHERE key_id = ANY($1::text[])", ids)}
            held = {
                row[0]: (int(row[1]), int(row[2]))
                for row in await self.pool.fetch(
                    "SELECT key_id, COALESCE(SUM(balance_nanos), 0), COALESCE(SUM(count), 0) FROM reservations WHERE key_id = ANY($1::text[]) GROUP BY key_id",
                    ids,
                )
            }
            if owners:
                held.update(
                    (row[0], (int(row[1]), int(row[2])))
                    for row in await self.pool.fetch(
                        "SELECT owner_id, COALESCE(SUM(balance_nanos), 0), COALESCE(SUM(count), 0) FROM reservations WHERE owner_id = ANY($1::text[]) GROUP BY owner_id",
                        list(owners),
                    )
                )
            stale = [Window(key_id, terms.created_at) for key_id, terms in wanted if key_id not in rows or rows[key_id]["window_start"] != terms.created_at]
            stale_keys = [window for window in stale if not window.key_id.startswith(ACCOUNT_ID_PREFIX)]
            stale_owners = [window for window in stale if window.key_id.startswith(ACCOUNT_ID_PREFIX)]
            totals = await window_totals(self.reader, stale_keys) if stale_keys else {}  # type: ignore[arg-type]
            if stale_owners:
                totals.update(await account_totals(self.reader, stale_owners))  # type: ignore[arg-type]
            granted = await grant_totals(self.reader, stale) if stale else {}  # type: ignore[arg-type]
        except UNREACHABLE as exc:
            raise unavailable(reason(exc)) from None
        result = {}
        for key_id, terms in wanted:
            account = self._cached(key_id, terms.created_at)
            row = rows.get(key_id)
            if row is not None and row["window_start"] == terms.created_at:
                _fill(account, row)
            else:
                t = totals.get((key_id,), Totals())
                account.set_charges((t.token_cost_nanos, t.count_charged, t.cost_nanos, t.requests, t.prompt_tokens + t.completion_tokens))
                account.granted_nanos, account.count_granted = granted.get(key_id, (0, 0))
            account.reserved_nanos, account.reserved_count = held.get(key_id, (0, 0))
            result[key_id] = account
        for key_id, terms in keys:
            result[key_id].owner = result[terms.owner] if terms.owner is not None else None
        return {key_id: result[key_id] for key_id, _ in keys}

    async def grant(self, grant: Grant, terms: KeyBilling) -> bool:
        """Durable before it returns; applied once fleet-wide per idempotency key."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                window = await conn.fetchval("SELECT window_start FROM accounts WHERE key_id = $1 FOR UPDATE", grant.key_id)
                applied = await conn.fetchval(
                    "INSERT INTO grants (key_id, kind, amount, reason, idempotency_key, ts) VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
                    grant.key_id,
                    grant.kind,
                    grant.amount,
                    grant.reason,
                    grant.idempotency_key,
                    grant.ts,
                )
                if applied is not None and window is not None and grant.ts >= window:
                    column = "granted_nanos" if grant.kind == CREDITS else "count_granted"
                    await conn.execute(f"UPDATE accounts SET {column} = {column} + $2 WHERE key_id = $1", grant.key_id, grant.amount)
        except UNREACHABLE as exc:
            raise unavailable(reason(exc)) from None
        await self.account(grant.key_id, terms)  # refresh this instance's view
        return applied is not None

    def remember_response(self, stored: StoredResponse) -> None:
        self._queue.put_nowait(stored)

    async def stored_response(self, response_id: str) -> StoredResponse | None:
        with reachable():
            row = await self.pool.fetchrow("SELECT response_id, key_id, provider, created_at FROM stored_responses WHERE response_id = $1", response_id)
        return None if row is None else StoredResponse(*row)

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """A setting shared by every instance (the session signing secret: a login on one
        instance is valid on all), created once."""
        with reachable():
            await self.pool.execute("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING", name, make())
            return str(await self.pool.fetchval("SELECT value FROM settings WHERE name = $1", name))

    # --- reads ------------------------------------------------------------------------------

    def query_in_order(self, query: Callable[[Any], Awaitable[T]]) -> tuple[int, asyncio.Future[T]]:
        """Run `query` (on an aiosqlite-shaped reader) once everything queued so far is written:
        the same contract as the embedded ledger's. Queries run one at a time in call order,
        each in one transaction, so the statements of one (an alert's record) stand or fall
        together and a later one (its re-arming) never overtakes it."""

        async def run() -> T:
            async with self._in_order:  # FIFO: waiters acquire in the order they asked
                await self.flush()
                async with self.pool.acquire() as conn, conn.transaction():
                    return await query(PgReader(conn))

        return 0, asyncio.ensure_future(run())

    async def totals(self, windows: list[Window], by_model: bool = False) -> dict[tuple[str, ...], Totals]:
        await self.flush()
        return await window_totals(self.reader, windows, by_model)  # type: ignore[arg-type]

    def vendor_month(self, provider: str, since: float, until: float) -> tuple[int, asyncio.Future[int]]:
        """The month's figure in `provider_spend`, which every settlement moves; the first
        instance to need it makes it from the provider rollup, with settlements held off."""
        return 0, asyncio.ensure_future(self._vendor_month(provider, since, until))

    async def _vendor_month(self, provider: str, since: float, until: float) -> int:
        select = "SELECT nanos FROM provider_spend WHERE provider = $1 AND since = $2 AND period_end = $3"
        with reachable():
            nanos = await self.pool.fetchval(select, provider, since, until)
            if nanos is None:
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", VENDOR_SPEND_LOCK)
                    await conn.execute(
                        # (The bounds are typed: `since` and `slot` would make PostgreSQL deduce two types for each.)
                        "INSERT INTO provider_spend (provider, since, period_end, nanos)"
                        " SELECT $1, $2::float8, $3::float8, COALESCE(SUM(vendor_cost_nanos), 0) FROM usage_provider_slot"
                        " WHERE provider = $1 AND slot >= $2::float8 AND slot < $3::float8"
                        " ON CONFLICT DO NOTHING",
                        provider,
                        since,
                        until,
                    )
                    nanos = await conn.fetchval(select, provider, since, until)
        return int(nanos)

    async def grants_in(self, windows: list[Window]) -> dict[str, tuple[int, int]]:
        await self.flush()
        return await grant_totals(self.reader, windows)  # type: ignore[arg-type]

    async def append_audit(self, entry: AuditEntry) -> None:
        try:
            await self.pool.execute(numbered(INSERT_AUDIT), *entry.row())
        except DATABASE_ERRORS:
            log.exception("audit entry not written to the ledger, recorded here instead: %r", entry.row())

    async def audit_entries(self, limit: int, before_id: int | None = None, key_id: str | None = None) -> list[dict[str, Any]]:
        return await read_audit_page(self.reader, limit, before_id, key_id)

    # --- the fleet ------------------------------------------------------------------------------

    # --- keys made and changed through the API, shared by the fleet (core/keys/records.py) ------

    async def key_records(self) -> KeyRecords:
        with reachable():
            rows = await self.pool.fetch(SELECT_RECORDS)
        return {row[0]: record_from_row(row) for row in rows}

    async def change_key_record(self, key_id: str, change: RecordChange) -> KeyRecord:
        """Read, change and store one key's record under its row lock (two admins editing one
        key on two instances each see the other's change), durably; the version tells the
        other instances."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                row = await conn.fetchrow(numbered(SELECT_RECORDS + " WHERE id = ? FOR UPDATE"), key_id)
                record = change(None if row is None else record_from_row(row))
                if row is None:
                    await conn.execute(numbered(INSERT_RECORD), *record_row(record))
                else:
                    await conn.execute(numbered(UPDATE_RECORD), *update_params(record))
                await conn.execute(
                    "INSERT INTO settings (name, value) VALUES ($1, '1') ON CONFLICT (name) DO UPDATE SET value = (settings.value::bigint + 1)::text",
                    SETTINGS_VERSION,
                )
        except asyncpg.UniqueViolationError as exc:
            raise RecordConflict("secret" if "digest" in (exc.constraint_name or "") else "id") from None
        except UNREACHABLE as exc:
            raise unavailable(reason(exc)) from None
        self._settings_version = None  # the next poll re-reads them
        return record

    # Accounts made and changed through the accounts API: as keys' records, under the same version.

    async def account_records(self) -> AccountRecords:
        with reachable():
            rows = await self.pool.fetch(SELECT_ACCOUNTS)
        return {row[0]: account_from_row(row) for row in rows}

    async def change_account_record(self, name: str, change: AccountChange) -> AccountRecord:
        """`change_key_record` for an account's record (by name), bumping the same version."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                row = await conn.fetchrow(numbered(SELECT_ACCOUNTS + " WHERE name = ? FOR UPDATE"), name)
                record = change(None if row is None else account_from_row(row))
                if row is None:
                    await conn.execute(numbered(INSERT_ACCOUNT), *account_row(record))
                else:
                    await conn.execute(numbered(UPDATE_ACCOUNT), *account_update_params(record))
                await conn.execute(
                    "INSERT INTO settings (name, value) VALUES ($1, '1') ON CONFLICT (name) DO UPDATE SET value = (settings.value::bigint + 1)::text",
                    SETTINGS_VERSION,
                )
        except UNREACHABLE as exc:
            raise unavailable(reason(exc)) from None
        self._settings_version = None
        return record

    def watch_key_records(self, apply: Callable[[KeyRecords, AccountRecords], None]) -> None:
        """Call `apply` with every stored key and account record whenever an instance changes
        one (polled: a one-row read every SETTINGS_POLL_SECONDS)."""
        self._settings_task = asyncio.create_task(self._poll_records(apply))

    async def _poll_records(self, apply: Callable[[KeyRecords, AccountRecords], None]) -> None:
        while True:
            try:
                version = await self.pool.fetchval("SELECT value FROM settings WHERE name = $1", SETTINGS_VERSION)
                if version != self._settings_version:
                    records, accounts = await self.key_records(), await self.account_records()
                    self._settings_version = version
                    apply(records, accounts)
            except DATABASE_ERRORS:
                pass  # the heartbeat reports the database's state; keys stay as they were
            await asyncio.sleep(SETTINGS_POLL_SECONDS)

    # --- the fleet ------------------------------------------------------------------------------

    async def _register(self, conn: asyncpg.Connection | None = None) -> None:
        config_hash, config_error = self.config_source()
        await (conn or self.pool).execute(
            "INSERT INTO instances (id, host, pid, started_at, config_hash, config_error) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp()",
            self.instance_id,
            socket.gethostname(),
            os.getpid(),
            time.time(),
            config_hash,
            config_error,
        )

    async def _heartbeat_loop(self) -> None:
        """Renew this instance's lease; remove instances whose lease ran out, and free what
        their requests held (database time throughout: hosts' clocks may differ)."""
        while True:
            try:
                await self.heartbeat()
                if self.database_error is not None:
                    log.warning("the PostgreSQL ledger is reachable again")
                self.database_error = None
            except DATABASE_ERRORS as exc:
                if self.database_error is None:
                    log.error("the PostgreSQL ledger cannot be reached: %s", exc)
                self.database_error = reason(exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def heartbeat(self) -> None:
        """On a connection of its own: were it to queue for the pool behind admissions (a
        busy instance has them all at work), its lease could run out while it serves, and
        another instance would free what its requests hold."""
        config_hash, config_error = self.config_source()
        if self._keeper is None or self._keeper.is_closed():
            self._keeper = await asyncpg.connect(
                self.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT, server_settings={"application_name": "tollgate-heartbeat"}
            )
        conn = self._keeper
        try:
            renewed = await conn.fetchval(
                "UPDATE instances SET heartbeat_at = clock_timestamp(), config_hash = $2, config_error = $3 WHERE id = $1 RETURNING id",
                self.instance_id,
                config_hash,
                config_error,
            )
            if renewed is None:
                log.warning("this instance's lease had expired (its reservations were freed by another instance); registering again")
                await self._register(conn)
            expired = await conn.fetch(
                "DELETE FROM instances WHERE heartbeat_at < clock_timestamp() - make_interval(secs => $1) RETURNING id, host, pid", LEASE_SECONDS
            )
            for instance_id, host, pid in expired:
                log.warning("instance %s (host %s, pid %s) stopped heartbeating; freeing what its requests held", instance_id, host, pid)
            await self._free_orphans(conn)
            self.live_instances = max(1, int(await conn.fetchval("SELECT COUNT(*) FROM instances")))
        except DATABASE_ERRORS:
            conn.terminate()  # a connection in an unknown state: the next beat makes a new one
            raise

    async def _free_orphans(self, conn: asyncpg.Connection) -> None:
        """Delete the reservations of instances that are gone, and bill what their streams had
        reported (as failed requests: the client lost the stream), in one transaction."""
        orphans = await conn.fetch(
            "SELECT request_id, key_id, owner_id FROM reservations r WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id)"
        )
        if not orphans:
            return
        async with conn.transaction():
            await lock_accounts(conn, [row["key_id"] for row in orphans] + [row["owner_id"] for row in orphans if row["owner_id"]])
            gone = await conn.fetch(
                "DELETE FROM reservations WHERE request_id = ANY($1::text[]) RETURNING request_id, reported", [row["request_id"] for row in orphans]
            )
            reported = [UsageRecord(*orjson.loads(row["reported"]))._replace(status=ERROR) for row in gone if row["reported"]]
            await settle_in(conn, reported, [])
        log.warning("freed %d reservations held by instances that stopped; billed what %d of their streams had reported", len(gone), len(reported))

    async def instances(self) -> list[dict[str, Any]]:
        """Every live instance with the config it serves (a fleet whose files differ shows)."""
        with reachable():
            rows = await self.pool.fetch(
                "SELECT id, host, pid, started_at, EXTRACT(EPOCH FROM heartbeat_at)::float8 AS heartbeat_at, config_hash, config_error FROM instances ORDER BY started_at, id"
            )
        return [{**dict(row), "this": row["id"] == self.instance_id} for row in rows]

    def health(self) -> dict[str, Any]:
        return {
            "backend": "postgresql",
            "writing": self.write_error is None,
            "last_write_error": self.write_error,
            "unwritten_rows": self._queue.qsize() + self._retrying,
            "database_reachable": self.database_error is None,
            "database_error": self.database_error,
            "instance": self.instance_id,
        }

    async def close(self) -> None:
        """Write everything queued, leave the fleet (freeing nothing: requests have ended), close."""
        stopped = [task for task in (self._heartbeat_task, self._settings_task, *self._admitters) if task is not None]
        for task in stopped:
            task.cancel()
        await asyncio.gather(*stopped, return_exceptions=True)  # (an admission cut short queues its releases first)
        if self._writer_task is not None and not self._writer_task.done():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(done)
            try:
                await asyncio.wait_for(asyncio.shield(done), CLOSE_WAIT_SECONDS)
            except TimeoutError:
                log.error("shutting down with %d ledger rows unwritten: %s", self._queue.qsize() + self._retrying, self.write_error)
            self._writer_task.cancel()
        try:
            await self.pool.execute("DELETE FROM instances WHERE id = $1", self.instance_id)
        except DATABASE_ERRORS:
            pass
        if self._keeper is not None:
            self._keeper.terminate()  # (nothing to finish: a close could wait on a database gone)
        await self.writer.close()
        await self.pool.close()


async def settle_in(conn: asyncpg.Connection, records: list[UsageRecord], freed: list[str]) -> None:
    """Charge `records` and end the reservations `freed`, in the caller's transaction. Every
    key's live state changes under its row lock, taken in key order (no deadlocks)."""
    if not records and not freed:
        return
    keys = [record.key_id for record in records] + [record.account_id for record in records if record.account_id]
    if any(record.vendor_cost_nanos for record in records):  # (a separate statement: the settlement's snapshot is taken after it)
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", VENDOR_SPEND_LOCK)
    await lock_accounts(conn, keys)
    columns = [list(values) for values in zip(*records, strict=True)] if records else [[] for _ in _USAGE_COLUMNS]
    await conn.fetchrow(_SETTLE_SQL, *columns, freed)


async def lock_accounts(conn: asyncpg.Connection, ids: list[str]) -> None:
    """Lock these rows of `accounts` in the one order every transaction uses: accounts'
    (`account:NAME`) before keys', each in id order. Admission locks a key's account before
    the key, so nothing can hold a key's row while waiting for its account's: no deadlock."""
    if ids:
        ordered = sorted(set(ids), key=lambda key_id: (not key_id.startswith(ACCOUNT_ID_PREFIX), key_id))
        await conn.execute(
            "SELECT 1 FROM unnest($1::text[]) WITH ORDINALITY AS o(key_id, n) JOIN accounts a USING (key_id) ORDER BY o.n FOR UPDATE OF a", ordered
        )


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's default reset costs a round trip (~75 µs) per use; our sessions change no
    state that needs resetting (transactions end before the connection goes back)."""


def _fill(account: Account, row: asyncpg.Record) -> None:
    account.set_charges((int(row["spent_nanos"]), int(row["count_used"]), int(row["total_cost_nanos"]), int(row["request_count"]), int(row["tokens_used"])))
    account.granted_nanos, account.count_granted = int(row["granted_nanos"]), int(row["count_granted"])


def redact(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _ignore_commit(seconds: float | None, unwritten: int) -> None:
    """`on_commit` until the app sets its metrics' hook."""
