"""Exact sums over a time window, fast: whole UTC days from the `usage_daily` rollup, and
only the partial days at the window's edges from the raw `usage` rows (indexed by key, time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import aiosqlite

DAY = 86400
MAX_WINDOWS_PER_QUERY = 4000  # 7 parameters each, under SQLite's 32,766


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def day_start(ts: float) -> float:
    return float(int(ts // DAY) * DAY)


@dataclass(frozen=True, slots=True)
class Window:
    key_id: str
    since: float
    until: float | None = None  # None: open-ended


@dataclass(slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_nanos: int = 0
    token_cost_nanos: int = 0
    count_charged: int = 0
    errors: int = 0
    images: int = 0  # the media endpoints' units (core/usage.py Usage)
    audio_ms: int = 0
    characters: int = 0
    cache_write_tokens: int = 0  # last: the column added after the others (schema 15)

    def add(self, row: Sequence[int]) -> None:
        """Add a row of sums in the order of _COLUMNS (the order of the fields)."""
        self.requests += row[0]
        self.prompt_tokens += row[1]
        self.completion_tokens += row[2]
        self.cached_tokens += row[3]
        self.cost_nanos += row[4]
        self.token_cost_nanos += row[5]
        self.count_charged += row[6]
        self.errors += row[7]
        self.images += row[8]
        self.audio_ms += row[9]
        self.characters += row[10]
        self.cache_write_tokens += row[11]

    def merge(self, other: Totals) -> None:
        """Add another's totals (per model and cost type into per model, or into one)."""
        self.add([getattr(other, field.name) for field in fields(other)])


def _split(window: Window) -> tuple[Any, ...]:
    """(key, raw_lo_from, raw_lo_to, first_full_day, end_day_exclusive, raw_hi_from, raw_hi_to)."""
    first_full = window.since if window.since == day_start(window.since) else day_start(window.since) + DAY
    if window.until is None:
        return (window.key_id, window.since, first_full, utc_day(first_full), None, None, None)
    last_start = day_start(window.until)
    if first_full >= last_start:  # no whole day inside: raw rows only
        return (window.key_id, window.since, window.until, None, None, None, None)
    return (window.key_id, window.since, first_full, utc_day(first_full), utc_day(last_start), last_start, window.until)


# Columns in the order of Totals.add, for a table aliased {t}: requests and errors differ
# between raw rows (one request each) and rollups (a count). The media units, then cache writes.
_ADDED_LATER = ", SUM({t}.images), SUM({t}.audio_ms), SUM({t}.characters), SUM({t}.cache_write_tokens)"
_COLUMNS = (
    "SUM({requests}), SUM({t}.prompt_tokens), SUM({t}.completion_tokens), SUM({t}.cached_tokens), SUM({t}.cost_nanos),"
    " COALESCE(SUM(CASE WHEN {t}.cost_type = 'token' THEN {t}.cost_nanos END), 0), SUM({t}.count_charged), SUM({errors})" + _ADDED_LATER
)
_KEY_DAY_COLUMNS = (
    "SUM(d.requests), SUM(d.prompt_tokens), SUM(d.completion_tokens), SUM(d.cached_tokens), SUM(d.cost_nanos), SUM(d.token_cost_nanos),"
    " SUM(d.count_charged), SUM(d.errors)" + _ADDED_LATER.format(t="d")
)


async def window_totals(db: aiosqlite.Connection, windows: Iterable[Window], by_model: bool = False) -> dict[tuple[str, ...], Totals]:
    """Totals per key (or per key, model and cost type) over each key's window."""
    totals: dict[tuple[str, ...], Totals] = {}
    windows = list(windows)
    all_time = [w.key_id for w in windows if w.since <= 0 and w.until is None]
    ranged = [w for w in windows if not (w.since <= 0 and w.until is None)]
    for start in range(0, len(all_time), MAX_WINDOWS_PER_QUERY):
        await _all_time_totals(db, all_time[start : start + MAX_WINDOWS_PER_QUERY], by_model, totals)
    for start in range(0, len(ranged), MAX_WINDOWS_PER_QUERY):
        await _ranged_totals(db, ranged[start : start + MAX_WINDOWS_PER_QUERY], by_model, totals)
    return totals


async def _all_time_totals(db: aiosqlite.Connection, key_ids: list[str], by_model: bool, totals: dict[tuple[str, ...], Totals]) -> None:
    """Windows from the beginning: the per key and model rollup holds the answer."""
    cte = f"WITH w(key_id) AS (VALUES {', '.join('(?)' for _ in key_ids)}) "
    if by_model:  # one rollup row per (key, model, cost type) already: nothing to group
        columns = "m.requests, m.prompt_tokens, m.completion_tokens, m.cached_tokens, m.cost_nanos, CASE WHEN m.cost_type = 'token' THEN m.cost_nanos ELSE 0 END, m.count_charged, m.errors,"
        columns += " m.images, m.audio_ms, m.characters, m.cache_write_tokens"
        sql = f"{cte}SELECT m.key_id, m.model, m.cost_type, {columns} FROM w CROSS JOIN usage_key_model m ON m.key_id = w.key_id"
    else:
        sql = f"{cte}SELECT m.key_id, {_COLUMNS.format(t='m', requests='m.requests', errors='m.errors')} FROM w CROSS JOIN usage_key_model m ON m.key_id = w.key_id GROUP BY m.key_id"
    await _collect(db, sql, key_ids, 3 if by_model else 1, totals)


# Typed placeholders: PostgreSQL reads an untyped parameter in VALUES as text (SQLite ignores
# the cast's precision words and reads a REAL).
_TIME = "CAST(? AS DOUBLE PRECISION)"
_RANGED_ROW = f"(CAST(? AS TEXT), {_TIME}, {_TIME}, CAST(? AS TEXT), CAST(? AS TEXT), {_TIME}, {_TIME})"


async def account_totals(db: aiosqlite.Connection, windows: Iterable[Window]) -> dict[tuple[str, ...], Totals]:
    """Totals per account (a Window's `key_id` is the account's ledger id, `account:NAME`) over
    each window: what every key in the account charged to its balance, from `usage_account_day`
    and the `account_id` of the raw rows at the window's edges."""
    totals: dict[tuple[str, ...], Totals] = {}
    windows = list(windows)
    for start in range(0, len(windows), MAX_WINDOWS_PER_QUERY):
        await _ranged_totals(db, windows[start : start + MAX_WINDOWS_PER_QUERY], False, totals, "account_id", "usage_account_day")
    return totals


async def _ranged_totals(
    db: aiosqlite.Connection,
    windows: list[Window],
    by_model: bool,
    totals: dict[tuple[str, ...], Totals],
    owner: str = "key_id",
    day_table: str = "usage_key_day",
) -> None:
    chunk = [_split(w) for w in windows]
    params = [value for row in chunk for value in row]
    cte = f"WITH w(key_id, lo_from, lo_to, day_from, day_to, hi_from, hi_to) AS (VALUES {', '.join(_RANGED_ROW for _ in chunk)}) "
    raw_group = "w.key_id, u.model, u.cost_type" if by_model else "w.key_id"
    raw = _COLUMNS.format(t="u", requests="1", errors="CASE WHEN u.status = 'error' THEN 1 ELSE 0 END")
    if by_model:
        days = f"SELECT w.key_id, d.model, d.cost_type, {_COLUMNS.format(t='d', requests='d.requests', errors='d.errors')} FROM w CROSS JOIN usage_daily d"
        days_group = "w.key_id, d.model, d.cost_type"
    else:
        days = f"SELECT w.key_id, {_KEY_DAY_COLUMNS} FROM w CROSS JOIN {day_table} d"
        days_group = "w.key_id"
    queries = (
        f"SELECT {raw_group}, {raw} FROM w CROSS JOIN usage u ON u.{owner} = w.key_id AND u.ts >= w.lo_from AND u.ts < w.lo_to GROUP BY {raw_group}",
        f"{days} ON d.{owner} = w.key_id AND d.day >= w.day_from AND (w.day_to IS NULL OR d.day < w.day_to) WHERE w.day_from IS NOT NULL GROUP BY {days_group}",
        f"SELECT {raw_group}, {raw} FROM w CROSS JOIN usage u ON u.{owner} = w.key_id AND u.ts >= w.hi_from AND u.ts < w.hi_to WHERE w.hi_from IS NOT NULL GROUP BY {raw_group}",
    )
    for sql in queries:
        await _collect(db, cte + sql, params, 3 if by_model else 1, totals)


async def _collect(db: aiosqlite.Connection, sql: str, params: list[Any], width: int, totals: dict[tuple[str, ...], Totals]) -> None:
    async with db.execute(sql, params) as cursor:
        rows = await cursor.fetchall()  # one hop to the database thread, not one per row
    for row in rows:
        totals.setdefault(tuple(row[:width]), Totals()).add([value or 0 for value in row[width:]])


async def grant_totals(db: aiosqlite.Connection, windows: Iterable[Window]) -> dict[str, tuple[int, int]]:
    """(credits in nanos, count credits) granted per key within each key's window."""
    result: dict[str, tuple[int, int]] = {}
    windows = list(windows)
    for start in range(0, len(windows), MAX_WINDOWS_PER_QUERY):
        chunk = windows[start : start + MAX_WINDOWS_PER_QUERY]
        values = ", ".join(f"(CAST(? AS TEXT), {_TIME}, {_TIME})" for _ in chunk)
        params = [value for w in chunk for value in (w.key_id, w.since, float("inf") if w.until is None else w.until)]
        sql = (
            f"WITH w(key_id, since, until) AS (VALUES {values}) SELECT w.key_id,"
            " COALESCE(SUM(CASE WHEN g.kind = 'credits' THEN g.amount END), 0), COALESCE(SUM(CASE WHEN g.kind = 'count_credits' THEN g.amount END), 0)"
            " FROM w CROSS JOIN grants g ON g.key_id = w.key_id AND g.ts >= w.since AND g.ts < w.until GROUP BY w.key_id"
        )
        async with db.execute(sql, params) as cursor:
            for row in await cursor.fetchall():
                result[row[0]] = (row[1], row[2])
    return result
