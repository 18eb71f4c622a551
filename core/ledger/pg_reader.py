"""An aiosqlite-shaped face on asyncpg, so the page, report and sum queries run unchanged on
both ledgers.

Those queries (core/reports.py, core/ledger/sums.py, core/alerts.py) are plain SQL written
with `?` placeholders and read through `db.execute(sql, params)` as a cursor. Here the
placeholders become `$1…$n` once per statement text, and integer sums come back as `int`:
PostgreSQL's SUM of a BIGINT is NUMERIC, which asyncpg returns as `Decimal`, and money in
this code base is integer nano-dollars.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from core.ledger.pg_errors import reachable


@functools.lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """The statement in PostgreSQL's spelling: `?` placeholders as `$1…$n` (the shared queries
    have no `?` inside string literals), and SQLite's `CROSS JOIN … ON` (a join-order hint
    for its planner) as a plain `JOIN … ON`."""
    parts = sql.replace("CROSS JOIN", "JOIN").split("?")
    out = [parts[0]]
    for number, part in enumerate(parts[1:], start=1):
        out.append(f"${number}{part}")
    return "".join(out)


def _plain(value: Any) -> Any:
    if type(value) is Decimal and value == value.to_integral_value():
        return int(value)
    return value


def plain_row(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_plain(value) for value in row)


class Cursor:
    """The rows of one statement, fetched a chunk at a time from a server-side cursor when
    the caller reads it with `fetchmany` (CSV exports of the whole log)."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, sql: str, params: Sequence[Any]):
        self._pool = pool
        self._sql = numbered(sql)
        self._params = list(params)
        self._conn: asyncpg.Connection | None = None
        self._owns_conn = False
        self._transaction: Any = None
        self._cursor: Any = None
        self._rows: list[tuple[Any, ...]] = []
        self.description: list[tuple[str, ...]] = []
        self.rowcount = -1

    async def open(self) -> Cursor:
        """Run the statement; the database out of reach is a 503 (core/ledger/pg_errors.py)."""
        with reachable():
            return await self._open()

    async def _open(self) -> Cursor:
        if isinstance(self._pool, asyncpg.Pool):
            self._conn = await self._pool.acquire()
            self._owns_conn = True
        else:
            self._conn = self._pool
        try:
            statement = await self._conn.prepare(self._sql)
            self.description = [(attribute.name,) for attribute in statement.get_attributes()]
            if self._owns_conn:
                self._transaction = self._conn.transaction(readonly=True)
                await self._transaction.start()
                self._cursor = await statement.cursor(*self._params)
            else:  # inside the caller's transaction, or a write: run it to the end now
                self._rows = [plain_row(row) for row in await statement.fetch(*self._params)]
                status = statement.get_statusmsg() or ""
                tail = status.rsplit(" ", 1)[-1]
                self.rowcount = int(tail) if tail.isdigit() else -1
        except BaseException:
            await self.close()
            raise
        return self

    async def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        if self._cursor is None:
            rows, self._rows = self._rows[:size], self._rows[size:]
            return rows
        return [plain_row(row) for row in await self._cursor.fetch(size)]

    async def fetchall(self) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        while chunk := await self.fetchmany(1000):
            rows.extend(chunk)
        return rows

    async def fetchone(self) -> tuple[Any, ...] | None:
        rows = await self.fetchmany(1)
        return rows[0] if rows else None

    async def close(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            await transaction.rollback()  # read-only: nothing to keep
        if self._owns_conn and self._conn is not None:
            conn, self._conn = self._conn, None
            await self._pool.release(conn)  # type: ignore[union-attr]


class _Execution:
    """What `execute` returns: awaitable (a cursor) and an async context manager (closes it)."""

    def __init__(self, cursor: Cursor):
        self._cursor = cursor

    def __await__(self) -> Generator[Any, None, Cursor]:
        return self._run().__await__()

    async def _run(self) -> Cursor:
        cursor = await self._cursor.open()
        if cursor._owns_conn:  # an awaited (not `async with`) read: take its rows and let go
            cursor._rows = await cursor.fetchall()
            cursor._cursor = None
            await cursor.close()
        return cursor

    async def __aenter__(self) -> Cursor:
        return await self._cursor.open()

    async def __aexit__(self, *exc: object) -> None:
        await self._cursor.close()


class PgReader:
    """`execute(sql, params)` over a pool (each read on its own connection) or over one
    connection (inside a transaction the caller holds)."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection):
        self.pool = pool

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Execution:
        return _Execution(Cursor(self.pool, sql, params))
