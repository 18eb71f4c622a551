"""Ready-made view data for the templates: formatted money, bars, chart geometry.

Templates stay dumb: every number they print is computed here from ledger values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from core.alerts import PROVIDER_ID_PREFIX
from core.config import API, ApiKey, Config
from core.keys.states import ACTIVE, effective_mode, key_status
from core.ledger import Account
from core.ledger.sums import Totals
from core.money_format import count_text, usd_text
from core.pricing import COUNT, TOKEN, to_nanos
from core.reports import DayPoint
from core.statements import LimitUse, quota_use
from core.units_format import unit_parts, units_text
from core.vendors.states import ProviderTotals

SHORT_ID = 8
MESSAGES = {
    "credits_added": "Credits added.",
    "count_credits_added": "Count credits added.",
    "already_applied": "That top-up was already applied (same form submitted twice).",
    "mode_set": "Billing mode updated in api.yaml and applied.",
    "invalid_amount": "The amount must be a positive number (count credits: a whole number).",
    "invalid_billing_mode": "Unknown billing mode.",
    "config_not_writable": "api.yaml could not be written: the billing mode is unchanged.",
    "config_changed": "api.yaml changed while it was being edited: the billing mode is unchanged; try again.",
    "config_invalid": "api.yaml has an error; fix it first (the config status says where).",
    "bad_csrf": "The form expired; please try again.",
    "key_updated": "Key settings saved and in force.",
    "nothing_changed": "Nothing changed: the form had the key's settings as they are.",
    "key_enabled": "Key enabled: its secret works again.",
    "key_disabled": "Key disabled: its requests get 403 key_disabled until it is enabled.",
    "key_deleted": "Key deleted: its secret no longer works. Its history stays here.",
    "key_already_made": "That form was already submitted and made this key; its secret was shown then, once. Rotate the key for a new one.",
    "key_in_account": "The key draws on its account's balance: top up the account.",
    "account_created": "Account made and in force: choose it in the New key form (Billing tab) to put keys in it.",
    "account_already_made": "That form was already submitted and made this account.",
    "account_updated": "Account settings saved and in force for all its keys.",
    "account_unchanged": "Nothing changed: the form had the account's settings as they are.",
    "account_deleted": "Account deleted: no key can be put in it. Its history stays here.",
    "billing_window_not_started": "The key's billing window (created_at) has not started: a top-up now would never count.",
}


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def percent(part: int, whole: int) -> int:
    if whole <= 0:
        return 0
    return max(0, min(100, round(part * 100 / whole)))


WARN_USED_PCT = 75
BAD_USED_PCT = 90


def use_level(used_pct: int | None) -> str:
    """A bar's colour from how much of the limit is used: ok below 75%, warn below 90%, then bad.
    (Credit bars show what is left, limit bars what is used; both are coloured by use.)"""
    if used_pct is None or used_pct < WARN_USED_PCT:
        return "ok"
    return "warn" if used_pct < BAD_USED_PCT else "bad"


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    name: str
    masked: str
    short_id: str  # tells apart keys whose masks look alike (short secrets show little)
    mode: str
    credits_text: str
    credits_pct: int | None
    credits_level: str
    count_text: str
    count_pct: int | None
    count_level: str
    spend_month: int  # nanos: the template formats it
    units_month: list[str]  # the media units used this month (["3 images", "12.5 min audio"]), if any
    requests_today: int
    status: str
    quota_text: str  # "used / limit", or "—" without a quota
    quota_pct: int | None
    quota_level: str
    quota_title: str  # the same with its unit, tokens or USD (a tooltip: the column is narrow)
    defined_in: str  # "api.yaml" or "API": where the key is defined
    deleted: bool
    account: str | None  # the name of the account whose balance it draws on


@dataclass(frozen=True, slots=True)
class AccountRow:
    name: str
    mode: str  # its keys' default
    credits_text: str
    credits_pct: int | None
    credits_level: str
    count_text: str
    count_pct: int | None
    count_level: str
    status: str
    spend: int  # nanos: every charge of its keys in its billing window (the API's total_cost)
    requests: int
    key_count: int
    window: str | None  # when its billing window started (created_at), if set
    defined_in: str
    line: int | None
    deleted: bool


def status_of(mode: str, remaining: int | None, remaining_count: int, key: ApiKey | None = None, now: float | None = None, deleted: bool = False) -> str:
    """deleted, disabled or expired (as the keys API says), else exhausted or active by its credits."""
    if key is not None:
        usable = key_status(key, time.time() if now is None else now, deleted)
        if usable != ACTIVE:
            return usable
    usd_gone = remaining is not None and remaining <= 0
    if mode == COUNT:
        return "exhausted" if remaining_count <= 0 else "active"
    if mode == TOKEN:
        return "exhausted" if usd_gone else "active"
    return "exhausted" if usd_gone and remaining_count <= 0 else "active"


def key_row(
    config: Config, key: ApiKey, account: Account, month: tuple[int, int], today: tuple[int, int], units_month: tuple[int, int, int] = (0, 0, 0)
) -> KeyRow:
    deleted = key.id in config.deleted_keys
    return KeyRow(
        id=key.id,
        name=key.name,
        masked=key.masked,
        short_id=key.id[:SHORT_ID],
        **_balance_cells(config, key, account, deleted),
        spend_month=month[1],
        units_month=unit_parts(*units_month),
        requests_today=today[0],
        **_quota_cells(quota_use(key, account)),
        defined_in=_origin(key),
        deleted=deleted,
        account=key.account.name if key.account is not None else None,
    )


def account_row(config: Config, account: ApiKey, balance: Account, key_count: int) -> AccountRow:
    """An account (its stand-in key) with the figures GET /v1/accounts gives for it."""
    deleted = account.name in config.deleted_accounts
    return AccountRow(
        name=account.name,
        **_balance_cells(config, account, balance, deleted),
        spend=balance.total_cost_nanos,
        requests=balance.request_count,
        key_count=key_count,
        window=when(account.billing.created_at) if account.billing.created_at else None,
        defined_in=_origin(account),
        line=account.line,
        deleted=deleted,
    )


def _origin(key: ApiKey) -> str:
    return "API" if key.defined_in == API else key.defined_in


def _balance_cells(config: Config, key: ApiKey, account: Account, deleted: bool = False) -> dict[str, Any]:
    """Mode, what is left of the credits and count credits (with bars), and the status."""
    terms = key.billing
    mode = effective_mode(config, key)
    remaining = account.remaining_nanos(terms)
    remaining_count = account.remaining_count(terms)
    holder = account.holder  # a key in an account: its bars are of the account's balance
    given = None if terms.credits_nanos is None else terms.credits_nanos + holder.granted_nanos
    given_count = terms.count_credits + holder.count_granted
    credits_pct = None if remaining is None or given is None else percent(remaining, given)
    count_pct = percent(remaining_count, given_count) if given_count > 0 else None
    return {
        "mode": mode,
        "credits_text": usd_text(remaining),
        "credits_pct": credits_pct,
        "credits_level": use_level(None if credits_pct is None else 100 - credits_pct),
        "count_text": count_text(remaining_count),
        "count_pct": count_pct,
        "count_level": use_level(None if count_pct is None else 100 - count_pct),
        "status": status_of(mode, remaining, remaining_count, key, deleted=deleted),
    }


def _quota_cells(use: LimitUse | None) -> dict[str, Any]:
    """The billing tab's quota column: used / limit in tokens or USD, with a bar of the use."""
    if use is None:
        return {"quota_text": "—", "quota_title": "no quota", "quota_pct": None, "quota_level": "ok"}
    shown, pct = (usd_text if use.usd else count_text), percent(use.used, use.limit)
    text = f"{shown(use.used)} / {shown(use.limit)}"
    return {"quota_text": text, "quota_title": f"{text} {'USD' if use.usd else 'tokens'} used", "quota_pct": pct, "quota_level": use_level(pct)}


def sort_value(sort: str, config: Config, key: ApiKey, account: Account, month: tuple[int, int], today: tuple[int, int]) -> Any:
    """What the billing tab sorts a key by: computed for every key, while whole rows are
    built only for the page shown (10,000 rows cost most of the tab's time)."""
    if sort == "name":
        return key.name.lower()
    if sort == "spend":
        return month[1]
    if sort == "today":
        return today[0]
    mode = effective_mode(config, key)
    if sort == "mode":
        return mode
    remaining = account.remaining_nanos(key.billing)
    if sort == "credits":
        return float("inf") if remaining is None else remaining
    if sort == "count":
        return account.remaining_count(key.billing)
    return status_of(mode, remaining, account.remaining_count(key.billing), key, deleted=key.id in config.deleted_keys)


def chart(points: list[DayPoint], width: int = 720, height: int = 160) -> dict[str, Any]:
    """Bars for cost per day, a line for requests per day, in SVG user units."""
    top_cost = max((p.cost_nanos for p in points), default=0) or 1
    top_requests = max((p.requests for p in points), default=0) or 1
    step = width / max(len(points), 1)
    bars, line = [], []
    for index, point in enumerate(points):
        bar_height = round(point.cost_nanos / top_cost * (height - 10), 1)
        x = round(index * step, 1)
        bars.append(
            {
                "x": x + 1,
                "y": height - bar_height,
                "w": max(step - 2, 1),
                "h": bar_height,
                "label": f"{point.day}: {usd_text(point.cost_nanos)}, {count_text(point.requests)} requests",
            }
        )
        line.append(f"{x + step / 2:.1f},{height - point.requests / top_requests * (height - 10):.1f}")
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "line": " ".join(line),
        "first": points[0].day if points else "",
        "last": points[-1].day if points else "",
        "max_cost": usd_text(top_cost if any(p.cost_nanos for p in points) else 0),
        "max_requests": max((p.requests for p in points), default=0),
    }


def cost_chart(days: list[tuple[str, ProviderTotals]], width: int = 720, height: int = 160) -> dict[str, Any]:
    """Two bars a day, the vendor cost and what keys were billed, on one scale, in SVG user
    units (a day whose every request's cost is unknown has no cost bar, not a $0 one)."""
    top = max((max(t.vendor_cost_nanos, t.billed_nanos) for _, t in days), default=0) or 1
    step = width / max(len(days), 1)
    bars = []
    for index, (day, totals) in enumerate(days):
        x = round(index * step, 1)
        cost = usd_text(totals.vendor_cost_nanos) if totals.cost_known else "unknown"
        unknown = f" ({count_text(totals.unknown_cost)} of unknown cost)" if totals.unknown_cost and totals.cost_known else ""
        label = f"{day}: vendor cost {cost}{unknown}, billed {usd_text(totals.billed_nanos)}, {count_text(totals.requests)} requests"
        half = max(step / 2 - 1, 0.5)
        for kind, nanos, left in (("cost", totals.vendor_cost_nanos, x + 1), ("billed", totals.billed_nanos, x + step / 2)):
            bar_height = round(nanos / top * (height - 10), 1)
            bars.append({"kind": kind, "x": round(left, 1), "y": height - bar_height, "w": round(half, 1), "h": bar_height, "label": label})
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "first": days[0][0] if days else "",
        "last": days[-1][0] if days else "",
        "max": usd_text(top if any(t.vendor_cost_nanos or t.billed_nanos for _, t in days) else 0),
    }


def breakdown_rows(totals: dict[tuple[str, ...], Totals]) -> list[dict[str, Any]]:
    """Per model and cost type, from `Ledger.totals(..., by_model=True)`."""
    return [
        {
            "model": model,
            "cost_type": cost_type,
            "requests": t.requests,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cached_tokens": t.cached_tokens,
            "cache_write_tokens": t.cache_write_tokens,
            "units": units_text(t.images, t.audio_ms, t.characters),
            "cost": t.cost_nanos,
            "count_credits": t.count_charged,
        }
        for (_, model, cost_type), t in sorted(totals.items())
    ]


def units_total(totals: dict[tuple[str, ...], Totals]) -> str:
    """The media units of all these totals, for a page ("" when there are none)."""
    total = Totals()
    for t in totals.values():
        total.merge(t)
    return units_text(total.images, total.audio_ms, total.characters)


def cache_text(read: int, written: int) -> str:
    """The cache's part of a prompt, after its token counts: " (1,000 cached, 100 cache
    writes)", only the parts that are not zero ("" when neither is)."""
    parts = [f"{count_text(count)} {what}" for count, what in ((read, "cached"), (written, "cache writes")) if count]
    return f" ({', '.join(parts)})" if parts else ""


def log_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "time": when(row["ts"]),
            "model": row["model"],
            "provider": row["provider"] or "—",
            "tokens": f"{count_text(row['prompt_tokens'])} / {count_text(row['completion_tokens'])}"
            + cache_text(row["cached_tokens"], row["cache_write_tokens"]),
            "units": units_text(row["images"], row["audio_ms"], row["characters"]),
            "cost": usd_text(row["cost_nanos"]) + (" · 1 credit" if row["count_charged"] else ""),
            "status": row["status"],
        }
        for row in rows
    ]


def grant_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "time": when(row["ts"]),
            "amount": usd_text(row["amount"]) if row["kind"] == "credits" else f"{count_text(row['amount'])} count credits",
            "reason": row["reason"],
        }
        for row in rows
    ]


def limit_rows(uses: list[LimitUse]) -> list[dict[str, Any]]:
    """The key's limits for the page: what, how much is used, and when it resets."""
    rows = []
    for use in uses:
        shown, pct = (usd_text if use.usd else count_text), percent(use.used, use.limit)
        rows.append(
            {"name": _limit_label(use), "used": shown(use.used), "limit": shown(use.limit), "pct": pct, "level": use_level(pct), "resets": _resets(use)}
        )
    return rows


def _limit_label(use: LimitUse) -> str:
    if use.name == "quota":
        return f"quota ({'usd' if use.usd else 'tokens'})"
    if use.name == "budget":
        return f"{use.period} budget"
    return {"rate_limit": f"requests {use.rule}", "token_rate_limit": f"tokens {use.rule}"}.get(use.name, use.name.replace("_", " "))


def _resets(use: LimitUse) -> str:
    if use.reset_seconds is not None:
        return f"in {_duration(use.reset_seconds)}"
    return "never" if use.name == "quota" else "when requests finish"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def alert_rows(rows: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """Alerts for the page: amounts in the page's money format, delivery in plain words."""
    out = []
    for row in rows:
        metric, _, period = row["metric"].partition(":")
        shown = usd_text if _is_money(metric, config.keys_by_id.get(row["key_id"])) else count_text
        amounts = f"{shown(_units(row['used'], shown))} of {shown(_units(row['limit_value'], shown))}"
        what = metric.replace("_", " ") + (f" ({period})" if period else "")
        out.append({"time": when(row["ts"]), **_alert_subject(row), "text": f"{what} crossed {round(row['threshold'] * 100)}% ({amounts})",
                    "status": row["status"], "status_class": ALERT_STATUS_CLASSES.get(row["status"], ""), "delivery": _delivery(row)})  # fmt: skip
    return out


def _alert_subject(row: dict[str, Any]) -> dict[str, str | None]:
    """Whose alert: a key by its name, or a provider's budget (key_id `provider:NAME`) named as
    the provider and linked to the Providers page, never shown as a key that is not there."""
    if row["key_id"].startswith(PROVIDER_ID_PREFIX):
        return {"key_name": f"provider {row['key_name']}", "href": "/admin/providers"}
    return {"key_name": row["key_name"], "href": None}


ALERT_STATUS_CLASSES = {"sent": "ok", "failed": "error", "pending": "estimated"}


def _is_money(metric: str, key: ApiKey | None) -> bool:
    """Credits and period budgets are USD; a quota is USD when the key's quota_type says so."""
    if metric == "quota":
        return key is not None and key.limits.quota_type == "usd"
    return metric != "count_credits"


def _units(recorded: str, shown: Any) -> int:
    """An alert's amount as recorded (an exact decimal string) in the unit `shown` formats."""
    return to_nanos(Decimal(recorded)) if shown is usd_text else int(Decimal(recorded))


def _delivery(row: dict[str, Any]) -> str:
    if row["status"] == "recorded":  # no webhook: nothing was to be delivered, nothing failed
        return "(no webhook configured)"
    attempts = row["attempts"]
    return f"{attempts} attempt{'s' if attempts != 1 else ''}" + (f", last error {row['last_error']}" if row["last_error"] else "")
