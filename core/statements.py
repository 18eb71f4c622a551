"""What a key holder may learn about their own key: where it stands against every limit,
usage per model, and monthly statements with opening and closing balances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core import reports
from core.config import ApiKey, Config
from core.config.billing import UNLIMITED
from core.keys.states import effective_mode
from core.ledger import Account, Ledger
from core.ledger.sums import Totals, Window
from core.limits import Limiter, period_bounds
from core.money_format import usd_json
from core.units_format import units_json


def _iso(ts: float, key: ApiKey) -> str:
    return datetime.fromtimestamp(ts, key.limits.timezone).isoformat()


def totals_json(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cached_tokens": t.cached_tokens,
        "cache_write_tokens": t.cache_write_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        **units_json(t.images, t.audio_ms, t.characters),
        "cost": usd_json(t.cost_nanos),
    }


@dataclass(frozen=True, slots=True)
class LimitUse:
    """One limit of a key and its use now, in whole units: nano-dollars when `usd`, else
    requests or tokens. The JSON API and the pages each format it their own way."""

    name: str
    limit: int
    used: int
    usd: bool = False
    rule: str | None = None  # rate limits: "60/min"
    period: str | None = None  # budgets: "daily", "weekly", "monthly"
    window: tuple[float, float] | None = None  # fixed windows and periods: start, end
    reset_seconds: float | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def limit_uses(key: ApiKey, limiter: Limiter, now: float) -> list[LimitUse]:
    """Each configured limit with its current use, window and seconds to reset."""
    limits = key.limits
    state = limiter.state(key)
    out: list[LimitUse] = []
    for kind, rules in (("requests", limits.rate_limits), ("tokens", limits.token_rate_limits)):
        for rule in rules:
            start = math.floor(now / rule.seconds) * rule.seconds
            window = state.windows.get((kind, rule.seconds))
            used = window.used + window.reserved if window is not None and window.start == start else 0
            name = "rate_limit" if kind == "requests" else "token_rate_limit"
            out.append(
                LimitUse(name, rule.limit, used, rule=rule.text, window=(start, start + rule.seconds), reset_seconds=round(start + rule.seconds - now, 3))
            )
    if limits.concurrency_limit is not None:
        out.append(LimitUse("concurrency_limit", limits.concurrency_limit, state.in_flight))
    for limit in limits.period_limits:
        period_start, period_end = period_bounds(limit.period, limits.timezone, now)
        spend = state.periods.get(limit.name)
        spent = spend.spent if spend is not None and spend.start == period_start else 0
        out.append(LimitUse(limit.name, limit.limit_nanos, spent, usd=True, period=limit.period, window=(period_start, period_end),
                            reset_seconds=round(period_end - now, 3)))  # fmt: skip
    return out


def quota_use(key: ApiKey, account: Account) -> LimitUse | None:
    limits = key.limits
    if limits.quota is None:
        return None
    return LimitUse("quota", limits.quota, Limiter.quota_used(key, account), usd=limits.quota_type == "usd")


def limits_status(key: ApiKey, limiter: Limiter, now: float) -> list[dict[str, Any]]:
    """`limit_uses` for the JSON API: money as exact USD numbers, windows as local times."""
    out = []
    for use in limit_uses(key, limiter, now):
        row: dict[str, Any] = {"name": use.name}
        if use.rule is not None:
            row["rule"] = use.rule
        if use.period is not None:
            row["period"] = use.period
        row.update(_amounts(use))
        if use.window is not None:
            row.update(window_start=_iso(use.window[0], key), window_end=_iso(use.window[1], key), reset_seconds=use.reset_seconds)
        out.append(row)
    return out


def quota_status(key: ApiKey, account: Account) -> dict[str, Any] | None:
    use = quota_use(key, account)
    return None if use is None else {"type": "usd" if use.usd else "tokens", **_amounts(use)}


def _amounts(use: LimitUse) -> dict[str, Any]:
    if use.usd:
        return {"limit": usd_json(use.limit), "used": usd_json(use.used), "remaining": usd_json(use.remaining)}
    return {"limit": use.limit, "used": use.used, "remaining": use.remaining}


async def key_usage(config: Config, ledger: Ledger, limiter: Limiter, key: ApiKey, now: float) -> dict[str, Any]:
    """`GET /v1/usage`: the key's balances, quota, limits with their use, and totals."""
    terms = key.billing
    account = await ledger.account(key.id, terms)
    if key.limits.meters_anything:  # (fleet mode: read afresh, other instances change it too)
        await limiter.prepare(key, now)
    totals = (await ledger.totals([Window(key.id, terms.created_at)])).get((key.id,), Totals())
    remaining = account.remaining_nanos(terms)
    return {
        "object": "key_usage",
        "name": key.name,
        "key": key.masked,
        "billing_mode": effective_mode(config, key),
        "enabled": key.limits.enabled,
        "expires_at": _iso(key.limits.expires_at, key) if key.limits.expires_at else None,
        "timezone": str(key.limits.timezone),
        "balance": {
            "credits": UNLIMITED if terms.credits_nanos is None else usd_json(terms.credits_nanos + account.holder.granted_nanos),
            "remaining_credits": UNLIMITED if remaining is None else usd_json(remaining),
            "count_credits": terms.count_credits + account.holder.count_granted,  # a key in an account: the account's
            "remaining_count_credits": account.remaining_count(terms),
        },
        "quota": quota_status(key, account),
        "limits": limits_status(key, limiter, now),
        "totals": totals_json(totals),
    }


async def usage_by_model(ledger: Ledger, key: ApiKey, period: str, now: float) -> dict[str, Any]:
    """`GET /v1/usage/models`: per model (all cost types together), most tokens first."""
    since = key.billing.created_at if period == "all" else max(key.billing.created_at, period_bounds(period, key.limits.timezone, now)[0])
    rows: dict[str, Totals] = {}
    for (_, model, _), t in (await ledger.totals([Window(key.id, since)], by_model=True)).items():
        rows.setdefault(model, Totals()).merge(t)
    data = [{"model": model, **totals_json(t)} for model, t in rows.items()]
    data.sort(key=lambda row: (-row["total_tokens"], row["model"]))
    return {"object": "list", "period": period, "since": _iso(since, key) if since else None, "data": data}


# Statements cover whole months the ledger can hold: none before the Unix epoch, and none
# whose end (the next month's first moment, in the key's zone) is past datetime's year 9999.
FIRST_YEAR, LAST_YEAR = 1970, 9998


def month_bounds(key: ApiKey, year: int, month: int) -> tuple[float, float]:
    zone = key.limits.timezone
    start = datetime(year, month, 1, tzinfo=zone)
    end = datetime(year + 1, 1, 1, tzinfo=zone) if month == 12 else datetime(year, month + 1, 1, tzinfo=zone)
    return start.timestamp(), end.timestamp()


async def monthly_usage(ledger: Ledger, key: ApiKey, year: int, month: int) -> dict[str, Any]:
    start, end = month_bounds(key, year, month)
    since = max(start, key.billing.created_at)
    by_model = await ledger.totals([Window(key.id, since, max(since, end))], by_model=True)
    items = [
        {"model": model, "cost_type": cost_type, **totals_json(t), "count_credits": t.count_charged} for (_, model, cost_type), t in sorted(by_model.items())
    ]
    total = Totals()
    for t in by_model.values():
        total.merge(t)
    return {"object": "monthly_usage", "key": key.masked, "year": year, "month": month, "period_start": _iso(start, key), "period_end": _iso(end, key),
            "line_items": items, "totals": {**totals_json(total), "count_credits": total.count_charged}}  # fmt: skip


async def monthly_bill(ledger: Ledger, key: ApiKey, year: int, month: int, now: float) -> dict[str, Any]:
    """A statement: line items, grants in the month, opening and closing balances."""
    usage = await monthly_usage(ledger, key, year, month)
    start, end = month_bounds(key, year, month)
    window = key.billing.created_at
    closing_at = min(end, now)
    opening = await _balance(ledger, key, window, max(window, start))
    closing = await _balance(ledger, key, window, max(window, closing_at))
    grants = [g for g in await reports.grant_history(ledger, key.id, limit=10_000) if start <= g["ts"] < end]
    return {
        **usage,
        "object": "monthly_bill",
        "grants": [
            {"time": _iso(g["ts"], key), "kind": g["kind"], "amount": usd_json(g["amount"]) if g["kind"] == "credits" else g["amount"], "reason": g["reason"]}
            for g in reversed(grants)
        ],
        "opening_balance": opening,
        "closing_balance": closing,
        "closing_balance_at": _iso(closing_at, key),
    }


async def _balance(ledger: Ledger, key: ApiKey, since: float, until: float) -> dict[str, Any]:
    terms = key.billing
    charges = (await ledger.totals([Window(key.id, since, until)])).get((key.id,), Totals()) if until > since else Totals()
    credits, count = (await ledger.grants_in([Window(key.id, since, until)])).get(key.id, (0, 0)) if until > since else (0, 0)
    return {
        "credits": UNLIMITED if terms.credits_nanos is None else usd_json(terms.credits_nanos + credits - charges.token_cost_nanos),
        "count_credits": terms.count_credits + count - charges.count_charged,
    }
