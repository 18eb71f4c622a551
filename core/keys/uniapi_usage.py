"""`GET /v1/token_usage?format=uniapi`: usage and balance in uni-api's shape.

uni-api (uni_api/api/stats.py token_usage_response) answers `usage`, one row per key and
model, and `query_details`: the window, the filters, and for a single key its balance as
strings (`"$8.5"`); its count-billing fork adds billing_mode, count_credits, count_balance
and total_requests. Money here is exact: `$` and a plain decimal of the nano-dollar amount,
never a float's rounding or an exponent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.config import ApiKey, Config
from core.keys.states import effective_mode
from core.ledger import Ledger
from core.ledger.sums import Totals, Window
from core.pricing import NANO_DIGITS, plain_decimal

DEFAULT_DAYS = 30  # uni-api's window when the query names none


async def uniapi_token_usage(
    config: Config,
    ledger: Ledger,
    keys: list[ApiKey],
    window: tuple[float | None, float | None],
    model: str | None,
    key_filter: str,
    single: ApiKey | None,
) -> dict[str, Any]:
    """`keys`' usage per model in `window` (each from its billing window's start), and the
    balance of `single` when the query is about one key (uni-api reports none for "all")."""
    start, end = window
    usage = await _usage(ledger, keys, start, end, model)
    details: dict[str, Any] = {
        "start_datetime": _iso(start),
        "end_datetime": _iso(end),
        "api_key_filter": key_filter,
        "model_filter": model or "all",
        "credits": None,
        "total_cost": None,
        "balance": None,
        "billing_mode": None,
        "count_credits": None,
        "count_balance": None,
        "total_requests": sum(row["request_count"] for row in usage),
    }
    if single is not None:
        details.update(await _balance(config, ledger, single))
    return {"usage": usage, "query_details": details}


async def _usage(ledger: Ledger, keys: list[ApiKey], start: float | None, end: float | None, model: str | None) -> list[dict[str, Any]]:
    """One row per key and model (token and count rows together), keys in order, models sorted."""
    windows = [Window(key.id, max(start or 0.0, key.billing.created_at), end) for key in keys]
    totals = await ledger.totals(windows, by_model=True)
    merged: dict[tuple[str, str], Totals] = {}
    for (key_id, name, _cost_type), part in sorted(totals.items()):
        if model is not None and name != model:
            continue
        into = merged.setdefault((key_id, name), Totals())
        into.requests += part.requests
        into.prompt_tokens += part.prompt_tokens
        into.completion_tokens += part.completion_tokens
    rows = []
    for key in keys:
        for (key_id, name), sums in merged.items():
            if key_id == key.id:
                rows.append(_row(key, name, sums))
    return rows


def _row(key: ApiKey, model: str, sums: Totals) -> dict[str, Any]:
    return {
        "api_key_prefix": key.masked,  # uni-api shows the secret's ends too (`sk-abcd...wxyz`)
        "model": model,
        "total_prompt_tokens": sums.prompt_tokens,
        "total_completion_tokens": sums.completion_tokens,
        "total_tokens": sums.prompt_tokens + sums.completion_tokens,
        "request_count": sums.requests,
    }


async def _balance(config: Config, ledger: Ledger, key: ApiKey) -> dict[str, Any]:
    """The key's terms and what is left of them, as api_keys_states computes them."""
    account = (await ledger.accounts([(key.id, key.billing)]))[key.id]
    terms = key.billing
    remaining = account.remaining_nanos(terms)
    credits = None if terms.credits_nanos is None else terms.credits_nanos + account.holder.granted_nanos
    return {
        "credits": "$-1" if credits is None else usd_string(credits),  # -1: unlimited, as api.yaml writes it
        "total_cost": usd_string(account.total_cost_nanos),
        "balance": None if remaining is None else usd_string(remaining),
        "billing_mode": effective_mode(config, key),
        "count_credits": terms.count_credits + account.holder.count_granted,
        "count_balance": account.remaining_count(terms),
    }


def usd_string(nanos: int) -> str:
    """uni-api's `"$" + str(amount)` (`$8.5`, `$10.0`), exact: from nano-dollars, no exponent."""
    return "$" + plain_decimal(nanos, NANO_DIGITS, point=True)


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
