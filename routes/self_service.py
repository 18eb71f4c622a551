"""Self-service: any key about itself (admins may ask about any key with `paid_key`)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import reports, statements
from core.config import ApiKey, Config
from core.errors import bad_request, forbidden, not_found
from core.keys.states import UNLIMITED
from core.ledger import Ledger
from core.money_format import cents_json, usd_json
from core.timeutil import days_before
from routes._http import authenticate, current_config, whole_number
from routes._json import ExactJSONResponse

PERIODS = ("daily", "monthly", "all")


def _subject(request: Request, config: Config) -> ApiKey:
    """The key asked about: the caller, or for admins the `paid_key` parameter."""
    caller = authenticate(request, config)
    asked = request.query_params.get("paid_key")
    if not asked:
        return caller
    if not caller.is_admin:
        raise forbidden("Only admin keys may ask about another key.", "not_your_key")
    key = config.key_index.find(asked)
    if key is None:
        raise not_found("No API key matches 'paid_key'.", "key_not_found", "paid_key")
    return key


def _now(request: Request) -> float:
    now: float = request.app.state.clock()
    return now


async def usage(request: Request) -> Response:
    config = current_config(request)
    key = _subject(request, config)
    meter = request.app.state.gateway.meter
    return ExactJSONResponse(await statements.key_usage(config, request.app.state.ledger, meter.limiter, key, _now(request)))


async def usage_models(request: Request) -> Response:
    config = current_config(request)
    key = _subject(request, config)
    period = request.query_params.get("period", "all")
    if period not in PERIODS:
        raise bad_request(f"The 'period' parameter must be one of {', '.join(PERIODS)}, got '{period}'.", "invalid_period", "period")
    return ExactJSONResponse(await statements.usage_by_model(request.app.state.ledger, key, period, _now(request)))


def _year_month(request: Request) -> tuple[int, int]:
    """The month asked for: ASCII digits, a real month, in a year statements can cover."""
    year, month = whole_number(request.path_params["year"]), whole_number(request.path_params["month"])
    if year is None or month is None or not 1 <= month <= 12 or not statements.FIRST_YEAR <= year <= statements.LAST_YEAR:
        message = f"Use /YYYY/MM with a real month of a year from {statements.FIRST_YEAR} to {statements.LAST_YEAR}, like /2025/01."
        raise bad_request(message, "invalid_month")
    return year, month


async def monthly_usage(request: Request) -> Response:
    config = current_config(request)
    key = _subject(request, config)
    return ExactJSONResponse(await statements.monthly_usage(request.app.state.ledger, key, *_year_month(request)))


async def monthly_bill(request: Request) -> Response:
    config = current_config(request)
    key = _subject(request, config)
    return ExactJSONResponse(await statements.monthly_bill(request.app.state.ledger, key, *_year_month(request), _now(request)))


async def legacy_subscription(request: Request) -> Response:
    """OpenAI's old `/dashboard/billing/subscription`: balance checkers read `hard_limit_usd`."""
    config = current_config(request)
    key = _subject(request, config)
    ledger: Ledger = request.app.state.ledger
    account = await ledger.account(key.id, key.billing)
    credits = key.billing.credits_nanos
    limit = 100_000_000.0 if credits is None else usd_json(credits + account.holder.granted_nanos)
    expires = key.limits.expires_at or 0
    return ExactJSONResponse(
        {
            "object": "billing_subscription",
            "has_payment_method": True,
            "soft_limit_usd": limit,
            "hard_limit_usd": limit,
            "system_hard_limit_usd": limit,
            "access_until": int(expires),
            "plan": {"title": key.billing.mode, "id": key.billing.mode},
            "tollgate_remaining_credits": UNLIMITED if credits is None else usd_json(account.remaining_nanos(key.billing) or 0),
        }
    )


async def legacy_usage(request: Request) -> Response:
    """OpenAI's old `/dashboard/billing/usage?start_date=&end_date=`: costs in cents, per day."""
    config = current_config(request)
    key = _subject(request, config)
    params = request.query_params
    try:
        end = date.fromisoformat(params["end_date"]) if params.get("end_date") else datetime.fromtimestamp(_now(request), UTC).date() + timedelta(days=1)
        start = date.fromisoformat(params["start_date"]) if params.get("start_date") else days_before(end, 100)
    except ValueError:
        raise bad_request("start_date and end_date must look like 2024-01-31.", "invalid_date") from None
    costs = await reports.daily_model_costs(request.app.state.ledger, key.id, start.isoformat(), end.isoformat(), since=key.billing.created_at)
    daily: list[dict[str, object]] = []
    day = start
    while day < end and len(daily) < 1000:
        items = [{"name": model, "cost": cents_json(nanos)} for model, nanos in costs.get(day.isoformat(), [])]
        daily.append({"timestamp": datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp(), "line_items": items})
        day += timedelta(days=1)
    total = sum(nanos for rows in costs.values() for _, nanos in rows)
    return ExactJSONResponse({"object": "list", "daily_costs": daily, "total_usage": cents_json(total)})


routes = [
    Route("/v1/usage", usage, methods=["GET"]),
    Route("/v1/usage/models", usage_models, methods=["GET"]),
    Route("/v1/billing/usage/{year}/{month}", monthly_usage, methods=["GET"]),
    Route("/v1/billing/bill/{year}/{month}", monthly_bill, methods=["GET"]),
    Route("/v1/dashboard/billing/subscription", legacy_subscription, methods=["GET"]),
    Route("/dashboard/billing/subscription", legacy_subscription, methods=["GET"]),
    Route("/v1/dashboard/billing/usage", legacy_usage, methods=["GET"]),
    Route("/dashboard/billing/usage", legacy_usage, methods=["GET"]),
]
