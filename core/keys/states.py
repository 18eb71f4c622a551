"""A key's billing state as the admin API and the pages show it, from config + ledger.

Money goes out as `usd_json` fragments: exact plain decimals, for an orjson response."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.config import ApiKey, Config
from core.config.billing import UNLIMITED
from core.ledger import Account, Ledger
from core.ledger.sums import Totals, Window
from core.money_format import usd_json
from core.pricing import COUNT, TOKEN
from core.pricing.listing import plain
from core.units_format import units_json

ACTIVE, DISABLED, EXPIRED, DELETED = "active", "disabled", "expired", "deleted"


def key_status(key: ApiKey, now: float, deleted: bool = False) -> str:
    """Whether the key may be used, in one word: the keys API and the pages say the same."""
    if deleted:
        return DELETED
    if not key.limits.enabled:
        return DISABLED
    if key.limits.expires_at is not None and now >= key.limits.expires_at:
        return EXPIRED
    return ACTIVE


def effective_mode(config: Config, key: ApiKey) -> str:
    return key.billing.mode if config.preferences.prices.count_billing_enabled else TOKEN


def keys_by_account(config: Config) -> dict[str, list[ApiKey]]:
    """Each account's keys, by account name (an account without keys has no entry)."""
    members: dict[str, list[ApiKey]] = {}
    for key in config.keys:
        if key.account is not None:
            members.setdefault(key.account.name, []).append(key)
    return members


async def key_state(config: Config, ledger: Ledger, key: ApiKey) -> dict[str, Any]:
    return (await key_states(config, ledger, [key]))[key.id]


async def key_states(config: Config, ledger: Ledger, keys: list[ApiKey]) -> dict[str, dict[str, Any]]:
    """States of many keys with two queries, whatever their number. The totals first: reading
    them writes what this process has queued, so the balances read after include its charges
    (in fleet mode balances are read from the database)."""
    by_model = await ledger.totals([Window(key.id, key.billing.created_at) for key in keys], by_model=True)
    accounts = await ledger.accounts([(key.id, key.billing) for key in keys])
    details: dict[str, list[dict[str, Any]]] = {key.id: [] for key in keys}
    for (key_id, model, cost_type), totals in sorted(by_model.items()):
        details[key_id].append(model_row(model, cost_type, totals))
    return {key.id: _state(config, key, accounts[key.id], details[key.id]) for key in keys}


def _state(config: Config, key: ApiKey, account: Account, details: list[dict[str, Any]]) -> dict[str, Any]:
    terms, holder = key.billing, account.holder  # a key in an account: the account's grants
    remaining = account.remaining_nanos(terms)
    return {
        "name": key.name,
        "billing_mode": effective_mode(config, key),
        "credits": UNLIMITED if terms.credits_nanos is None else usd_json(terms.credits_nanos + holder.granted_nanos),
        "count_credits": terms.count_credits + holder.count_granted,
        "remaining_credits": UNLIMITED if remaining is None else usd_json(remaining),
        "remaining_count_credits": account.remaining_count(terms),
        "total_cost": usd_json(account.total_cost_nanos),
        "request_count": account.request_count,
        "enabled": True,
        "created_at": datetime.fromtimestamp(terms.created_at, UTC).isoformat() if terms.created_at else None,
        "price_multiplier": plain(terms.price_multiplier),
        "cost_details": {"billing_details": details},
    }


def model_row(model: str, cost_type: str, totals: Totals) -> dict[str, Any]:
    return {
        "model": model,
        "cost": usd_json(totals.cost_nanos),
        "cost_type": cost_type,
        "request_count": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cached_tokens": totals.cached_tokens,
        "cache_write_tokens": totals.cache_write_tokens,
        "total_tokens": totals.prompt_tokens + totals.completion_tokens,
        **units_json(totals.images, totals.audio_ms, totals.characters),
        "count_credits_used": totals.count_charged if cost_type == COUNT else 0,
    }


async def usage_rows(ledger: Ledger, key: ApiKey, since: float, until: float | None = None, model: str | None = None) -> list[dict[str, Any]]:
    totals = await ledger.totals([Window(key.id, since, until)], by_model=True)
    return [model_row(m, cost_type, t) for (_, m, cost_type), t in sorted(totals.items()) if model is None or m == model]
