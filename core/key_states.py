"""A key's billing state as the admin API and the pages show it, from config + ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.config import ApiKey, Config
from core.ledger import Ledger
from core.pricing import COUNT, TOKEN, from_nanos
from core.sqlite_ledger import SqliteLedger

UNLIMITED = -1


def usd(nanos: int) -> float:
    """JSON number for a nano-dollar amount (exact up to 15 significant digits)."""
    return float(from_nanos(nanos))


def effective_mode(config: Config, key: ApiKey) -> str:
    return key.billing.mode if config.preferences.prices.count_billing_enabled else TOKEN


async def key_state(config: Config, ledger: Ledger, key: ApiKey) -> dict[str, Any]:
    terms = key.billing
    account = await ledger.account(key.id, terms)
    remaining = account.remaining_nanos(terms)
    details = await ledger_usage(ledger, key.id, terms.created_at)
    return {
        "name": key.name,
        "billing_mode": effective_mode(config, key),
        "credits": UNLIMITED if terms.credits_nanos is None else usd(terms.credits_nanos + account.granted_nanos),
        "count_credits": terms.count_credits + account.count_granted,
        "remaining_credits": UNLIMITED if remaining is None else usd(remaining),
        "remaining_count_credits": account.remaining_count(terms),
        "total_cost": usd(account.total_cost_nanos),
        "request_count": account.request_count,
        "enabled": True,
        "created_at": datetime.fromtimestamp(terms.created_at, UTC).isoformat() if terms.created_at else None,
        "cost_details": {"billing_details": details},
    }


async def ledger_usage(ledger: Ledger, key_id: str, since: float, until: float | None = None, model: str | None = None) -> list[dict[str, Any]]:
    assert isinstance(ledger, SqliteLedger)
    rows = await ledger.usage_by_model(key_id, since, until, model)
    return [
        {
            "model": row["model"],
            "cost": usd(row["cost_nanos"]),
            "cost_type": row["cost_type"],
            "request_count": row["request_count"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cached_tokens": row["cached_tokens"],
            "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
            "count_credits_used": row["count_charged"] if row["cost_type"] == COUNT else 0,
        }
        for row in rows
    ]
