"""Read-only queries behind the web pages and CSV exports.

Aggregates come from the rollup tables (sized by keys, days and models, never by the size
of the log); the request log is read a page at a time through the (key, time)
index; exports stream rows with a cursor instead of loading them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from core.ledger import Ledger
from core.ledger.sums import DAY, day_start, utc_day

LOG_PAGE = 50
EXPORT_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class DayPoint:
    day: str
    requests: int
    cost_nanos: int


def today(now: float | None = None) -> str:
    return utc_day(time.time() if now is None else now)


def month_start(now: float | None = None) -> str:
    return today(now)[:8] + "01"


def this_month(now: float | None = None) -> str:
    return today(now)[:7]


async def daily_series(ledger: Ledger, key_id: str | None, days: int = 30, now: float | None = None) -> list[DayPoint]:
    """One point per UTC day for the last `days` days, today included, zeros filled in."""
    await ledger.flush()
    end = day_start(time.time() if now is None else now)
    labels = [utc_day(end - DAY * offset) for offset in range(days - 1, -1, -1)]
    if key_id is None:
        sql, params = "SELECT day, SUM(requests), SUM(cost_nanos) FROM usage_day_model WHERE day >= ? GROUP BY day", [labels[0]]
    else:
        sql, params = "SELECT day, requests, cost_nanos FROM usage_key_day WHERE key_id = ? AND day >= ?", [key_id, labels[0]]
    async with ledger.reader.execute(sql, params) as cursor:
        found = {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}
    return [DayPoint(day, *found.get(day, (0, 0))) for day in labels]


async def totals_since(ledger: Ledger, since_day: str, key_id: str | None = None) -> tuple[int, int]:
    """(requests, cost in nanos) from the start of `since_day` until now."""
    await ledger.flush()
    if key_id is None:
        sql, params = "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(cost_nanos), 0) FROM usage_day_model WHERE day >= ?", [since_day]
    else:
        sql, params = "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(cost_nanos), 0) FROM usage_key_day WHERE key_id = ? AND day >= ?", [key_id, since_day]
    async with ledger.reader.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def by_key_in_month(ledger: Ledger, month: str) -> dict[str, tuple[int, int]]:
    """key id → (requests, cost in nanos) in the month `YYYY-MM`."""
    await ledger.flush()
    async with ledger.reader.execute("SELECT key_id, requests, cost_nanos FROM usage_key_month WHERE month = ?", (month,)) as cursor:
        return {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}


async def by_key_on_day(ledger: Ledger, day: str) -> dict[str, tuple[int, int]]:
    """key id → (requests, cost in nanos) on one UTC day."""
    await ledger.flush()
    async with ledger.reader.execute("SELECT key_id, requests, cost_nanos FROM usage_key_day WHERE day = ?", (day,)) as cursor:
        return {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}


async def units_by_key_since(ledger: Ledger, key_ids: list[str], since_day: str) -> dict[str, tuple[int, int, int]]:
    """key id → (images, audio ms, characters) from the start of `since_day`, for the keys
    that used any (a page's keys: read through the (key, day) primary key)."""
    if not key_ids:
        return {}
    await ledger.flush()
    sql = (
        f"SELECT key_id, SUM(images), SUM(audio_ms), SUM(characters) FROM usage_key_day WHERE key_id IN ({', '.join('?' for _ in key_ids)})"
        " AND day >= ? GROUP BY key_id HAVING SUM(images) + SUM(audio_ms) + SUM(characters) > 0"
    )
    async with ledger.reader.execute(sql, [*key_ids, since_day]) as cursor:
        return {row[0]: (row[1], row[2], row[3]) for row in await cursor.fetchall()}


async def top_keys_in_month(ledger: Ledger, month: str, limit: int = 5) -> list[tuple[str, int, int]]:
    """(key id, requests, cost in nanos), most expensive first."""
    await ledger.flush()
    sql = "SELECT key_id, requests, cost_nanos FROM usage_key_month WHERE month = ? ORDER BY cost_nanos DESC, requests DESC LIMIT ?"
    async with ledger.reader.execute(sql, (month, limit)) as cursor:
        return [(row[0], row[1], row[2]) for row in await cursor.fetchall()]


async def top_models(ledger: Ledger, since_day: str, key_id: str | None = None, limit: int = 5) -> list[tuple[str, int, int]]:
    """(model, requests, cost in nanos), most expensive first."""
    await ledger.flush()
    if key_id is None:
        sql, params = "SELECT model, SUM(requests), SUM(cost_nanos) FROM usage_day_model WHERE day >= ?", [since_day]
    else:
        sql, params = "SELECT model, SUM(requests), SUM(cost_nanos) FROM usage_daily WHERE key_id = ? AND day >= ?", [key_id, since_day]
    sql += " GROUP BY model ORDER BY SUM(cost_nanos) DESC, SUM(requests) DESC LIMIT ?"
    async with ledger.reader.execute(sql, [*params, limit]) as cursor:
        return [(row[0], row[1], row[2]) for row in await cursor.fetchall()]


async def daily_model_costs(ledger: Ledger, key_id: str, start_day: str, end_day: str, since: float = 0.0) -> dict[str, list[tuple[str, int]]]:
    """UTC day → [(model, token-billed cost in nanos)] for days in [start_day, end_day) from
    the day of `since` on (whole days: the legacy usage API's resolution)."""
    await ledger.flush()
    first = max(start_day, utc_day(since)) if since else start_day
    sql = (
        "SELECT day, model, SUM(cost_nanos) FROM usage_daily WHERE key_id = ? AND cost_type = 'token' AND day >= ? AND day < ?"
        " GROUP BY day, model ORDER BY day, model"
    )
    result: dict[str, list[tuple[str, int]]] = {}
    async with ledger.reader.execute(sql, (key_id, first, end_day)) as cursor:
        for day, model, nanos in await cursor.fetchall():
            result.setdefault(day, []).append((model, nanos))
    return result


async def request_log(ledger: Ledger, key_id: str, before: float | None = None, limit: int = LOG_PAGE) -> list[dict[str, Any]]:
    """The newest requests of a key, older than `before` (keyset paging on the (key, ts) index)."""
    await ledger.flush()
    sql = (
        "SELECT ts, model, provider, prompt_tokens, completion_tokens, cached_tokens, cost_type, cost_nanos, count_charged, status, request_id,"
        " images, audio_ms, characters, cache_write_tokens FROM usage WHERE key_id = ? AND ts < ? ORDER BY ts DESC LIMIT ?"
    )
    async with ledger.reader.execute(sql, (key_id, float("inf") if before is None else before, limit)) as cursor:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


async def grant_history(ledger: Ledger, key_id: str, limit: int = 50) -> list[dict[str, Any]]:
    await ledger.flush()
    sql = "SELECT ts, kind, amount, reason, idempotency_key FROM grants WHERE key_id = ? ORDER BY ts DESC LIMIT ?"
    async with ledger.reader.execute(sql, (key_id, limit)) as cursor:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


EXPORT_COLUMNS = (
    "ts",
    "request_id",
    "key_id",
    "key_name",
    "model",
    "provider",
    "upstream_model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_type",
    "unit_prices",
    "cost_nanos",
    "count_charged",
    "status",
    "cache_write_tokens",
    "reasoning_tokens",
    "images",
    "audio_ms",
    "characters",
)


async def iter_requests(ledger: Ledger, key_id: str | None, since: float, until: float) -> AsyncIterator[tuple[Any, ...]]:
    """Every logged request in [since, until), oldest first, fetched a chunk at a time."""
    await ledger.flush()
    sql = f"SELECT {', '.join(EXPORT_COLUMNS)} FROM usage WHERE ts >= ? AND ts < ?"
    params: list[Any] = [since, until]
    if key_id is not None:
        sql += " AND key_id = ?"
        params.append(key_id)
    # One key: the (key, time) index. All keys: insertion order, which is time order, so the
    # export streams without sorting the log.
    async with ledger.reader.execute(sql + (" ORDER BY ts" if key_id is not None else " ORDER BY id"), params) as cursor:
        while rows := await cursor.fetchmany(EXPORT_CHUNK):
            for row in rows:
                yield tuple(row)
