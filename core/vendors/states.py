"""Each provider's month as the admin API, the Providers page and its CSV export show it:
requests, vendor cost, what keys were billed for its calls, the margin between them, and the
budget; read from the ledger's provider rollup (`usage_provider_slot`).

Days and months are calendar days and months in `preferences.timezone` (the budgets' month):
whole 15-minute slots of the rollup in every time zone in use today.

A vendor cost is *unknown* where no vendor price applied (core.pricing.vendor): such requests
are counted (`unknown_cost_requests`), never priced at $0. The margin is taken over the
requests whose vendor cost is known, so an unknown cost never shows as profit.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from core.config import Config
from core.errors import bad_request
from core.ledger import Ledger
from core.limits import period_bounds
from core.money_format import usd_json
from core.upstream_gate import Connections

# A provider at its max_connections (this process's calls: core/upstream_gate.py) is busy, not failing.
OK, OVER_BUDGET, COOLING_DOWN, AT_MAX_CONNECTIONS = "ok", "over_budget", "cooling_down", "at_max_connections"
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_CHUNK = 500  # rollup rows fetched at a time by a streamed export
_COLUMNS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_nanos",
    "vendor_cost_nanos",
    "unknown_cost",
    "priced_billed_nanos",
    "errors",
    "cache_write_tokens",
)  # in ProviderTotals.add's order
_SUMS = ", ".join(f"SUM({column})" for column in _COLUMNS)


@dataclass(slots=True)
class ProviderTotals:
    """Sums of the provider rollup over a span of time."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    billed_nanos: int = 0
    vendor_cost_nanos: int = 0  # of the requests whose vendor cost is known
    unknown_cost: int = 0  # requests of unknown vendor cost
    priced_billed_nanos: int = 0  # billed, for the requests whose vendor cost is known
    errors: int = 0
    cache_write_tokens: int = 0

    def add(self, row: Any) -> None:
        self.requests += int(row[0] or 0)
        self.prompt_tokens += int(row[1] or 0)
        self.completion_tokens += int(row[2] or 0)
        self.cached_tokens += int(row[3] or 0)
        self.billed_nanos += int(row[4] or 0)
        self.vendor_cost_nanos += int(row[5] or 0)
        self.unknown_cost += int(row[6] or 0)
        self.priced_billed_nanos += int(row[7] or 0)
        self.errors += int(row[8] or 0)
        self.cache_write_tokens += int(row[9] or 0)

    def merge(self, other: ProviderTotals) -> None:
        self.add(_row(other))

    @property
    def cost_known(self) -> bool:
        """False when every request's vendor cost is unknown: there is no cost to show."""
        return self.requests == 0 or self.unknown_cost < self.requests

    @property
    def margin_nanos(self) -> int:
        return self.priced_billed_nanos - self.vendor_cost_nanos


@dataclass(slots=True)
class ProviderMonth:
    """One provider's month and today, per upstream model too."""

    month: ProviderTotals = field(default_factory=ProviderTotals)
    today: ProviderTotals = field(default_factory=ProviderTotals)
    models: dict[str, ProviderTotals] = field(default_factory=dict)


def month_bounds(zone: ZoneInfo, now: float, month: str | None) -> tuple[float, float, str]:
    """[start, end) of `month` (YYYY-MM; None: the current one) in the zone, and its name."""
    if month is None:
        start, end = period_bounds("monthly", zone, now)
        return start, end, datetime.fromtimestamp(start, zone).strftime("%Y-%m")
    match = _MONTH.fullmatch(month)
    if match is None or not 1 <= int(match.group(2)) <= 12 or not 1970 <= int(match.group(1)) <= 9998:  # its end is a valid date too
        raise bad_request("'month' must be a month written YYYY-MM, like 2026-11.", "invalid_month", "month")
    first = datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=zone)
    start, end = period_bounds("monthly", zone, first.timestamp())
    return start, end, month


async def provider_sums(ledger: Ledger, spans: dict[str, tuple[float, float]], by_model: str | None = None) -> dict[str, dict[str, ProviderTotals]]:
    """Totals per span name and provider over each [start, end); with `by_model` (a span's
    name), that span is summed per provider and upstream model too (`provider\\x00model`)."""
    await ledger.flush()  # what this process has queued counts
    result: dict[str, dict[str, ProviderTotals]] = {}
    for name, (start, end) in spans.items():
        group = "provider, upstream_model" if name == by_model else "provider"
        sql = f"SELECT {group}, {_SUMS} FROM usage_provider_slot WHERE slot >= ? AND slot < ? GROUP BY {group}"
        async with ledger.reader.execute(sql, (start, end)) as cursor:
            rows = await cursor.fetchall()
        sums = result.setdefault(name, {})
        width = 2 if name == by_model else 1
        for row in rows:
            label = "\x00".join(str(part) for part in row[:width])
            sums.setdefault(label, ProviderTotals()).add(row[width:])
    return result


async def provider_months(config: Config, ledger: Ledger, now: float, month: str | None = None) -> tuple[str, dict[str, ProviderMonth]]:
    """Every provider's month (`month`, or the current one) and today: the configured ones in
    config order, then any other the ledger names (a usage report's `provider`)."""
    zone = config.preferences.timezone
    start, end, label = month_bounds(zone, now, month)
    today = period_bounds("daily", zone, now)
    sums = await provider_sums(ledger, {"month": (start, end), "today": today}, by_model="month")
    found: dict[str, ProviderMonth] = {provider.name: ProviderMonth() for provider in config.providers}
    for name, totals in sums.get("month", {}).items():
        provider, model = name.split("\x00", 1)
        entry = found.setdefault(provider, ProviderMonth())
        entry.models[model] = totals
        entry.month.merge(totals)
    for provider, totals in sums.get("today", {}).items():
        found.setdefault(provider, ProviderMonth()).today = totals
    return label, found


def _row(totals: ProviderTotals) -> tuple[int, ...]:
    return (
        totals.requests,
        totals.prompt_tokens,
        totals.completion_tokens,
        totals.cached_tokens,
        totals.billed_nanos,
        totals.vendor_cost_nanos,
        totals.unknown_cost,
        totals.priced_billed_nanos,
        totals.errors,
        totals.cache_write_tokens,
    )


def cost_json(totals: ProviderTotals) -> orjson.Fragment | None:
    """The vendor cost, or null when every request's is unknown (never $0)."""
    return usd_json(totals.vendor_cost_nanos) if totals.cost_known else None


def budget_used(spent_nanos: int, budget_nanos: int) -> Decimal:
    """The share of the budget spent (1 and more: reached), to four decimals, rounded down."""
    return (Decimal(spent_nanos) / Decimal(budget_nanos)).quantize(Decimal("0.0001"), rounding="ROUND_DOWN")


@dataclass(slots=True)
class ProviderState:
    """One provider's month as the API and the Providers page show it: its totals, budget and status."""

    name: str
    configured: bool  # in the config (else only named by the ledger: a usage report's `provider`)
    entry: ProviderMonth
    budget_nanos: int | None
    budget_action: str | None
    status: str
    cooling_down_models: list[str]
    connections: Connections | None = None  # this process's calls to it (a configured provider's)

    @property
    def budget_used(self) -> Decimal | None:
        return None if self.budget_nanos is None else budget_used(self.entry.month.vendor_cost_nanos, self.budget_nanos)


async def provider_state_list(
    config: Config,
    ledger: Ledger,
    now: float,
    month: str | None = None,
    cooling: dict[str, list[str]] | None = None,
    connections: dict[str, Connections] | None = None,
) -> tuple[str, bool, list[ProviderState]]:
    """Every provider's state in `month` (None: the current one): (the month, whether it is the
    current one, the states). A past month is never over budget: its budget no longer binds.
    `cooling` and `connections`: this process's routes cooling down and calls per provider."""
    label, months = await provider_months(config, ledger, now, month)
    current = month is None or label == month_bounds(config.preferences.timezone, now, None)[2]
    configured = {provider.name: provider for provider in config.providers}
    cooling, connections = cooling or {}, connections or {}
    states = []
    for name, entry in months.items():
        provider = configured.get(name)
        terms = provider.vendor if provider is not None else None
        budget = terms.monthly_budget_nanos if terms is not None else None
        if budget is not None and entry.month.vendor_cost_nanos >= budget and current:
            status = OVER_BUDGET
        elif name in cooling:
            status = COOLING_DOWN
        elif current and name in connections and connections[name].full:  # (a past month's status is not today's)
            status = AT_MAX_CONNECTIONS
        else:
            status = OK
        action = terms.budget_action if budget is not None and terms is not None else None
        states.append(ProviderState(name, provider is not None, entry, budget, action, status, sorted(cooling.get(name, [])), connections.get(name)))
    return label, current, states


async def provider_states(
    config: Config,
    ledger: Ledger,
    now: float,
    month: str | None = None,
    cooling: dict[str, list[str]] | None = None,
    connections: dict[str, Connections] | None = None,
) -> dict[str, Any]:
    """GET /v1/providers_states: per provider, today and the month (see the module doc)."""
    label, _, states = await provider_state_list(config, ledger, now, month, cooling, connections)
    return {"month": label, "timezone": str(config.preferences.timezone), "providers": [_state_json(state) for state in states]}


def _connections_json(connections: Connections | None) -> dict[str, Any] | None:
    if connections is None:
        return None
    return {"in_flight": connections.in_flight, "max_connections": connections.limit, "waiting": connections.waiting}


def _state_json(state: ProviderState) -> dict[str, Any]:
    entry, used = state.entry, state.budget_used
    return {
        "provider": state.name,
        "configured": state.configured,
        "requests_today": entry.today.requests,
        "cost_today": cost_json(entry.today),
        "billed_today": usd_json(entry.today.billed_nanos),
        "requests_this_month": entry.month.requests,
        "cost_this_month": cost_json(entry.month),
        "billed_this_month": usd_json(entry.month.billed_nanos),
        "margin_this_month": usd_json(entry.month.margin_nanos) if entry.month.cost_known else None,
        "unknown_cost_requests": entry.month.unknown_cost,
        "errors_this_month": entry.month.errors,
        "monthly_budget": usd_json(state.budget_nanos) if state.budget_nanos is not None else None,
        "budget_action": state.budget_action,
        "budget_used": orjson.Fragment(str(used).encode()) if used is not None else None,
        "status": state.status,
        "cooling_down_models": state.cooling_down_models,
        "connections": _connections_json(state.connections),
        "models": [
            {
                "model": model,
                "requests": totals.requests,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                "cached_tokens": totals.cached_tokens,
                "cache_write_tokens": totals.cache_write_tokens,
                "cost": cost_json(totals),
                "billed": usd_json(totals.billed_nanos),
                "margin": usd_json(totals.margin_nanos) if totals.cost_known else None,
                "unknown_cost_requests": totals.unknown_cost,
                "errors": totals.errors,
            }
            for model, totals in sorted(entry.models.items())
        ],
    }


def day_starts(zone: ZoneInfo, now: float, days: int) -> list[tuple[str, float, float]]:
    """The last `days` calendar days in the zone, oldest first: (YYYY-MM-DD, start, end)."""
    today = datetime.fromtimestamp(now, zone).date()
    out = []
    for back in range(days - 1, -1, -1):
        day = today - timedelta(days=back)
        start = datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
        following = day + timedelta(days=1)
        out.append((day.isoformat(), start, datetime(following.year, following.month, following.day, tzinfo=zone).timestamp()))
    return out


async def daily_provider_series(config: Config, ledger: Ledger, now: float, days: int = 30) -> dict[str, list[tuple[str, ProviderTotals]]]:
    """Each provider's vendor cost and billed amount per calendar day, the last `days` days
    (the Providers page's chart): one query, the days folded from the 15-minute slots."""
    zone = config.preferences.timezone
    spans = day_starts(zone, now, days)
    await ledger.flush()
    sql = f"SELECT provider, slot, {_SUMS} FROM usage_provider_slot WHERE slot >= ? AND slot < ? GROUP BY provider, slot"
    async with ledger.reader.execute(sql, (spans[0][1], spans[-1][2])) as cursor:
        rows = await cursor.fetchall()
    series: dict[str, list[tuple[str, ProviderTotals]]] = {
        name: [(day, ProviderTotals()) for day, _, _ in spans] for name in [p.name for p in config.providers]
    }
    starts = [start for _, start, _ in spans]
    for row in rows:
        provider, slot = str(row[0]), float(row[1])
        index = bisect.bisect_right(starts, slot) - 1
        days_of = series.setdefault(provider, [(day, ProviderTotals()) for day, _, _ in spans])
        days_of[index][1].add(row[2:])
    return series


async def month_totals(config: Config, ledger: Ledger, now: float) -> ProviderTotals:
    """Every provider's current month summed (the overview's vendor cost and margin tiles)."""
    zone = config.preferences.timezone
    start, end, _ = month_bounds(zone, now, None)
    total = ProviderTotals()
    for totals in (await provider_sums(ledger, {"month": (start, end)})).get("month", {}).values():
        total.merge(totals)
    return total


def day_range(zone: ZoneInfo, first: date, last: date) -> tuple[float, float]:
    """[first day 00:00, the day after `last` 00:00) in the zone, as unix seconds."""
    following = last + timedelta(days=1)
    return (
        datetime(first.year, first.month, first.day, tzinfo=zone).timestamp(),
        datetime(following.year, following.month, following.day, tzinfo=zone).timestamp(),
    )


async def provider_days(config: Config, ledger: Ledger, since: float, until: float) -> AsyncIterator[tuple[str, str, str, ProviderTotals]]:
    """(YYYY-MM-DD in preferences.timezone, provider, upstream model, totals) for every day of
    [since, until) with usage, oldest day first: the rollup's slots read in time order (a
    slot never straddles two days: every zone's offset is a multiple of 15 minutes), a day
    folded and given out when the next one starts, so a long range streams."""
    zone = config.preferences.timezone
    await ledger.flush()
    sql = f"SELECT provider, upstream_model, slot, {', '.join(_COLUMNS)} FROM usage_provider_slot WHERE slot >= ? AND slot < ? ORDER BY slot"
    day = ""
    folded: dict[tuple[str, str], ProviderTotals] = {}
    async with ledger.reader.execute(sql, (since, until)) as cursor:
        while rows := await cursor.fetchmany(_CHUNK):
            for row in rows:
                row_day = datetime.fromtimestamp(float(row[2]), zone).date().isoformat()
                if row_day != day:
                    for (provider, model), totals in sorted(folded.items()):
                        yield day, provider, model, totals
                    day, folded = row_day, {}
                folded.setdefault((str(row[0]), str(row[1])), ProviderTotals()).add(row[3:])
    for (provider, model), totals in sorted(folded.items()):
        yield day, provider, model, totals
